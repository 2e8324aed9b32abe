"""Ring buffer records -> JSON-ready event dicts.

Output shape (the agent's public event format, also sent to the controller)::

    tracefleet.model.Event.to_json(): the JSON shape is defined there, once, for the
    agent's jsonl and the controller's API; this module builds it straight from the record
    (no intermediate objects on the hot path).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
import struct
import time
from typing import Any

from tracefleet.agent.capture import eventsets
from tracefleet.agent.capture.eventsets import BY_ID, ArgSpec
from tracefleet.agent.kernel.abi import (
    TF_ARG_MAX,
    TF_ARGV_COUNT,
    TF_BLOB_MAX,
    TF_PATH_MAX,
    Kind,
    PathKind,
    Status,
    Strategy,
    Syscall,
    TfBlob,
    TfEvent,
    TfExecEvent,
    TfHdr,
    TfStr,
    TfVfsEvent,
)
from tracefleet.agent.kernel.mounts import MountTable, dev_label, dev_of_dir
from tracefleet.model import flag_names

HDR_SIZE = ctypes.sizeof(TfHdr)
# the record encoding (events.h): a fixed part, then strings, each a head of TF_STRH_SIZE
# bytes (uptr, err, len, status, strategy) and len bytes
TF_STRH_SIZE = TfStr.data.offset
TF_ARGVH_SIZE = TfExecEvent.arg_len.offset - TfExecEvent.argv_uptr.offset
_STRH = struct.Struct("=QiHBB")
STRH_LEN_OFF, STRH_STATUS_OFF = TfStr.len.offset, TfStr.status.offset
# where a record's argument statuses are, for the lost check of the user-space fallback (here
# and in the compiled consumer): kind -> (offset of the first string head, string heads in a
# row, whether an argv head follows them; its status sits where a string head's does)
LOST_HEADS: dict[int, tuple[int, int, bool]] = {
    Kind.SYSCALL: (TfEvent.str.offset, 3, False),
    Kind.EXEC: (TfExecEvent.filename.offset, 1, True),
}
assert TfExecEvent.argv_status.offset - TfExecEvent.argv_uptr.offset == STRH_STATUS_OFF
_U16 = struct.Struct("=H")
SYSCALL_NAMES = {int(s): s.name.lower() for s in Syscall}


# labels by code, made once from the enums (an enum call per argument cost more than the rest
# of the argument's decode)
_STATUS_LABELS = {int(s): s.label for s in Status}
_STRATEGY_LABELS = {int(s): s.label for s in Strategy}


def _status(code: int) -> str:
    return _STATUS_LABELS.get(code) or f"unknown({code})"


def _strategy(code: int) -> str:
    return _STRATEGY_LABELS.get(code) or f"unknown({code})"


def _err(value: int) -> str:
    return errno.errorcode.get(-value, str(value)) if value < 0 else ""


def text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


# statuses whose bytes are shown (a torn or mismatched name is shown too, marked, never as
# the truth)
_SHOWN = (int(Status.OK), int(Status.RECOVERED), int(Status.TRUNCATED), int(Status.TORN),
          int(Status.MISMATCH))  # fmt: skip
_BLOB_SHOWN = (int(Status.OK), int(Status.RECOVERED), int(Status.TRUNCATED), int(Status.REREAD))
_ARGV_SHOWN = (int(Status.OK), int(Status.RECOVERED), int(Status.TRUNCATED))


def str_arg(s: TfStr) -> dict[str, Any]:
    out: dict[str, Any] = {
        "value": text(bytes(s.data)[: s.len]) if s.status in _SHOWN else None,
        "status": _status(s.status),
        "strategy": _strategy(s.strategy),
        "addr": hex(s.uptr),
    }
    if s.err:
        out["error"] = _err(s.err)
    return out


def decode_sockaddr(raw: bytes) -> dict[str, Any]:
    if len(raw) < 2:
        return {"family": "short", "raw": raw.hex()}
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET and len(raw) >= 8:
        port = struct.unpack_from("!H", raw, 2)[0]
        return {"family": "inet", "address": str(ipaddress.IPv4Address(raw[4:8])), "port": port}
    if family == socket.AF_INET6 and len(raw) >= 24:
        port = struct.unpack_from("!H", raw, 2)[0]
        addr = ipaddress.IPv6Address(raw[8:24])
        return {"family": "inet6", "address": str(addr), "port": port}
    if family == socket.AF_UNIX:
        path = raw[2:]
        if path[:1] == b"\0":
            return {"family": "unix", "path": "@" + text(path[1:].rstrip(b"\0"))}
        return {"family": "unix", "path": text(path.split(b"\0", 1)[0])}
    return {"family": str(family), "raw": raw.hex()}


def decode_open_how(raw: bytes) -> dict[str, Any]:
    if len(raw) < 24:
        return {"raw": raw.hex()}
    flags, mode, resolve = struct.unpack_from("=QQQ", raw)
    return {"flags": flags, "mode": mode, "resolve": resolve}


def blob_arg(b: TfBlob, kind: str) -> dict[str, Any]:
    value: Any = None
    if b.status in _BLOB_SHOWN:
        raw = bytes(b.data)[: b.len]
        value = decode_sockaddr(raw) if kind == "sockaddr" else decode_open_how(raw)
    out: dict[str, Any] = {
        "value": value,
        "status": _status(b.status),
        "strategy": _strategy(b.strategy),
        "addr": hex(b.uptr),
    }
    if b.err:
        out["error"] = _err(b.err)
    return out


class _WallClock:
    """CLOCK_REALTIME - CLOCK_MONOTONIC (bpf_ktime_get_ns is CLOCK_MONOTONIC), re-read every
    second so NTP steps and slews are followed."""

    def __init__(self) -> None:
        self.offset = 0
        self.read_at = -(1 << 62)

    def offset_at(self, now_ns: int) -> int:
        if now_ns - self.read_at >= 1_000_000_000:
            # the narrowest of three bracketing reads: a preemption between them is not
            # counted into the offset
            best = None
            for _ in range(3):
                m0 = time.monotonic_ns()
                r = time.time_ns()
                m1 = time.monotonic_ns()
                if best is None or m1 - m0 < best[0]:
                    best = (m1 - m0, r - (m0 + m1) // 2)
            assert best is not None
            self.offset, self.read_at = best[1], now_ns
        return self.offset


WALL_CLOCK = _WallClock()


def _header(h: TfHdr, now_ns: int) -> dict[str, Any]:
    spec = BY_ID.get(h.event_set)
    return {
        "ts_ns": h.ts_ns,
        "time_ns": h.ts_ns + WALL_CLOCK.offset_at(now_ns),
        "duration_ns": max(0, h.exit_ns - h.ts_ns) if h.exit_ns else 0,
        "delivery_latency_ns": max(0, now_ns - h.ts_ns),
        "event_set": spec.name if spec else str(h.event_set),
        "syscall": SYSCALL_NAMES.get(h.syscall, str(h.syscall)),
        "pid": h.pid,
        "tid": h.tid,
        "comm": text(h.comm),
        "ret": h.ret,
        "cgroup_id": h.cgroup_id,
        "strategy": _strategy(h.strategy),
        "ppid": h.ppid if h.ctx_ok else None,
        "uid": h.uid if h.ctx_ok else None,
        "gid": h.gid if h.ctx_ok else None,
        "exe": None,  # the consumer resolves it from the header's identity (exe.py)
    }


# Arguments declared `int` in the kernel: the register's upper half is not part of them.
_INT32_ARGS = frozenset({"dfd", "olddfd", "newdfd", "fd"})


def _int_arg(name: str, raw: int) -> int:
    if name in _INT32_ARGS:
        raw &= 0xFFFFFFFF
        return raw - (1 << 32) if raw & 0x80000000 else raw
    return raw


def _int_args(spec: ArgSpec, iargs: Any, syscall: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, i in spec.ints:
        value = _int_arg(name, int(iargs[i]))
        out[name] = {"value": value, "status": "ok", "strategy": "register"}
        names = flag_names(syscall, name, value)
        if names is not None:  # a flag set: raw value kept, names added
            out[name]["names"] = list(names)
    return out


_MOUNTS = MountTable()
_PATH_KINDS: dict[int, str] = {PathKind.D_PATH: "d_path", PathKind.WALK: "walk",
               PathKind.MOUNT_REL: "mount-relative", PathKind.USER: "as-passed",
               PathKind.AT_OPEN: "at-open"}  # fmt: skip
# what `arg` holds, per operation
_VFS_ARG = {"vfs_open": "flags", "vfs_truncate": "length", "vfs_mkdir": "mode",
            "vfs_setattr": "attr"}  # fmt: skip
_VFS_PATH2 = {"vfs_rename": "new_path", "vfs_link": "new_path", "vfs_symlink": "target"}
# what vfs_close adds (TfVfsEvent fields of the same names)
VFS_CLOSE_COUNTERS = ("bytes_read", "bytes_written", "reads", "writes", "pos")


def _plain(value: Any) -> dict[str, Any]:
    return {"value": value, "status": "ok", "strategy": "kernel"}


def vfs_path_arg(s: TfStr, kind: int, dev: int, pid: int) -> dict[str, Any]:
    out = str_arg(s)
    out.pop("addr", None)
    out["kind"] = _PATH_KINDS.get(kind, "none")  # IntEnum keys match the raw byte
    if kind == PathKind.MOUNT_REL and out["value"] is not None:
        # only a dentry was at hand: prefix the mount point when it is unambiguous
        mp = _MOUNTS.mount_point(dev, pid)
        out["mount_relative"] = out["value"]
        if mp is not None:
            out["mount"] = mp
            out["value"] = mp.rstrip("/") + out["value"] if out["value"] != "/" else mp
    return out


def _vfs_args(rec: TfVfsEvent, op: str) -> dict[str, Any]:
    pid = rec.hdr.pid
    args: dict[str, Any] = {"path": vfs_path_arg(rec.path, rec.path_kind, rec.dev, pid)}
    if op in _VFS_PATH2:
        args[_VFS_PATH2[op]] = vfs_path_arg(rec.path2, rec.path2_kind, rec.dev, pid)
    args["inode"] = _plain(rec.ino or None)
    dev, fstype = rec.dev, text(rec.fstype)
    if not dev and args["path"]["value"]:
        # an absolute path seen at a syscall: the kernel did not look it up, so find the
        # file system from its directory, as the process sees it
        dev = dev_of_dir(rec.hdr.pid, args["path"]["value"])
        fstype = _MOUNTS.fstype(dev, rec.hdr.pid) if dev else ""
        args["dev"] = {"value": dev_label(dev) if dev else None, "status": "ok" if dev else
                       "lost", "strategy": "user-space"}  # fmt: skip
        args["fstype"] = {"value": fstype or None, "status": "ok" if fstype else "lost",
                          "strategy": "user-space"}  # fmt: skip
    else:
        args["dev"] = _plain(dev_label(dev))
        args["fstype"] = _plain(fstype)
    if op in _VFS_ARG:
        args[_VFS_ARG[op]] = _plain(rec.arg)
        names = flag_names(op, _VFS_ARG[op], rec.arg)
        if names is not None:
            args[_VFS_ARG[op]]["names"] = list(names)
    if op == "vfs_close":
        for name in VFS_CLOSE_COUNTERS:
            args[name] = _plain(int(getattr(rec, name)))
    return args


class RecordError(ValueError):
    """A record that does not follow the encoding (truncated, or lengths that do not add up
    to its size): counted as a decode error by the consumer."""


def _put_str(rec: ctypes.Structure, dst: int, raw: bytes, off: int, limit: int) -> int:
    """Copy the string at raw[off:] (head and bytes) to offset dst of rec; returns the offset
    after it. Every length is checked against the record's size and the string's buffer."""
    n = len(raw)
    if off + TF_STRH_SIZE > n:
        raise RecordError(f"record truncated: {n} bytes, a string head at byte {off}")
    length: int = _STRH.unpack_from(raw, off)[2]
    if length > limit:
        raise RecordError(f"string of {length} bytes at byte {off}: its buffer holds {limit}")
    end = off + TF_STRH_SIZE + length
    if end > n:
        raise RecordError(f"record truncated: {n} bytes, a {length}-byte string ends at {end}")
    ctypes.memmove(ctypes.addressof(rec) + dst, raw[off:end], end - off)
    return end


def _put_fixed(rec: ctypes.Structure, raw: bytes, size: int) -> int:
    if len(raw) < size:
        raise RecordError(f"record truncated: {len(raw)} bytes, its fixed part is {size}")
    ctypes.memmove(ctypes.addressof(rec), raw[:size], size)
    return size


def _str_off(field: Any, i: int = 0) -> int:
    return int(field.offset) + i * ctypes.sizeof(TfStr)


def expand(raw: bytes) -> ctypes.Structure:
    """A ring buffer record (events.h's compact encoding) -> the kernel's working struct for
    its kind (TfEvent, TfExecEvent, TfVfsEvent), string bytes past their length zeroed.
    Raises RecordError when the record is truncated or its lengths do not add up to its
    size exactly."""
    n = len(raw)
    if n < HDR_SIZE:
        raise RecordError(f"record of {n} bytes is shorter than the header ({HDR_SIZE})")
    kind = TfHdr.from_buffer_copy(raw, 0).kind
    rec: ctypes.Structure
    if kind == Kind.SYSCALL:
        rec = TfEvent()
        off = _put_fixed(rec, raw, TfEvent.str.offset)
        off = _put_str(rec, _str_off(TfEvent.str, 0), raw, off, TF_PATH_MAX - 1)
        off = _put_str(rec, _str_off(TfEvent.str, 1), raw, off, TF_PATH_MAX - 1)
        off = _put_str(rec, TfEvent.blob.offset, raw, off, TF_BLOB_MAX)
    elif kind == Kind.EXEC:
        erec = rec = TfExecEvent()
        off = _put_fixed(erec, raw, TfExecEvent.filename.offset)
        off = _put_str(erec, TfExecEvent.filename.offset, raw, off, TF_PATH_MAX - 1)
        if off + TF_ARGVH_SIZE > n:
            raise RecordError(f"record truncated: {n} bytes, the argv head at byte {off}")
        ctypes.memmove(ctypes.addressof(erec) + TfExecEvent.argv_uptr.offset,
                       raw[off : off + TF_ARGVH_SIZE], TF_ARGVH_SIZE)  # fmt: skip
        off += TF_ARGVH_SIZE
        if erec.argc > TF_ARGV_COUNT:
            raise RecordError(f"argc {erec.argc} exceeds the {TF_ARGV_COUNT} entries kept")
        for i in range(erec.argc):
            if off + 2 > n:
                raise RecordError(f"record truncated: {n} bytes, argv[{i}] at byte {off}")
            length = _U16.unpack_from(raw, off)[0]
            if length > TF_ARG_MAX - 1:
                raise RecordError(f"argv[{i}] of {length} bytes: its buffer holds "
                                  f"{TF_ARG_MAX - 1}")  # fmt: skip
            off += 2
            if off + length > n:
                raise RecordError(f"record truncated: {n} bytes, argv[{i}] ends at "
                                  f"{off + length}")  # fmt: skip
            erec.arg_len[i] = length
            ctypes.memmove(ctypes.addressof(erec) + TfExecEvent.argv.offset + i * TF_ARG_MAX,
                           raw[off : off + length], length)  # fmt: skip
            off += length
    elif kind == Kind.VFS:
        rec = TfVfsEvent()
        off = _put_fixed(rec, raw, TfVfsEvent.path.offset)
        off = _put_str(rec, TfVfsEvent.path.offset, raw, off, TF_PATH_MAX - 1)
        off = _put_str(rec, TfVfsEvent.path2.offset, raw, off, TF_PATH_MAX - 1)
    else:
        raise RecordError(f"unknown record kind {kind}")
    if off != n:
        raise RecordError(f"{n - off} bytes after the last string of a {n}-byte record")
    return rec


def record_size(rec: ctypes.Structure) -> int:
    """The size of rec's record in the ring (the encoding's length, as the kernel computes
    it): for tests and the benchmark's bytes per record."""
    if isinstance(rec, TfEvent):
        strs = [rec.str[0].len, rec.str[1].len, rec.blob.len]
        return TfEvent.str.offset + sum(TF_STRH_SIZE + int(n) for n in strs)
    if isinstance(rec, TfExecEvent):
        argv = sum(2 + int(rec.arg_len[i]) for i in range(rec.argc))
        fixed = TfExecEvent.filename.offset + TF_STRH_SIZE + TF_ARGVH_SIZE
        return fixed + int(rec.filename.len) + argv
    if isinstance(rec, TfVfsEvent):
        return TfVfsEvent.path.offset + 2 * TF_STRH_SIZE + int(rec.path.len) + int(rec.path2.len)
    raise TypeError(f"not a record struct: {type(rec).__name__}")


def encode_record(rec: ctypes.Structure) -> bytes:
    """The record the kernel writes for rec (the inverse of expand): for tests."""
    raw = bytes(rec)

    def s(off: int, length: int) -> bytes:
        return raw[off : off + TF_STRH_SIZE + length]

    if isinstance(rec, TfEvent):
        return (raw[: TfEvent.str.offset] + s(_str_off(TfEvent.str, 0), rec.str[0].len)
                + s(_str_off(TfEvent.str, 1), rec.str[1].len)
                + s(TfEvent.blob.offset, rec.blob.len))  # fmt: skip
    if isinstance(rec, TfExecEvent):
        out = raw[: TfExecEvent.filename.offset] + s(TfExecEvent.filename.offset,
                                                     rec.filename.len)  # fmt: skip
        out += raw[TfExecEvent.argv_uptr.offset : TfExecEvent.arg_len.offset]
        for i in range(rec.argc):
            out += _U16.pack(rec.arg_len[i]) + bytes(rec.argv[i])[: rec.arg_len[i]]
        return out
    if isinstance(rec, TfVfsEvent):
        return (raw[: TfVfsEvent.path.offset] + s(TfVfsEvent.path.offset, rec.path.len)
                + s(TfVfsEvent.path2.offset, rec.path2.len))  # fmt: skip
    raise TypeError(f"not a record struct: {type(rec).__name__}")


def has_lost_arg(raw: bytes) -> bool:
    """Is any argument of this record (syscall or exec) lost? Read from the string heads; a
    malformed record says no here (decoding it reports it)."""
    try:
        kind = TfHdr.kind.offset
        where = LOST_HEADS.get(int.from_bytes(raw[kind : kind + 2], "little"))
        if where is None:
            return False
        off, heads, argv_head = where
        for _ in range(heads):
            _, _, length, status, _ = _STRH.unpack_from(raw, off)
            if status == Status.LOST:
                return True
            off += TF_STRH_SIZE + length
        return argv_head and raw[off + STRH_STATUS_OFF] == Status.LOST
    except (struct.error, IndexError):
        return False


def decode_record(raw: bytes, now_ns: int) -> tuple[dict[str, Any], ctypes.Structure]:
    """Decode one ring buffer record; returns (event dict, the ctypes struct)."""
    rec = expand(raw)
    return decode_struct(rec, now_ns), rec


def decode_struct(rec: ctypes.Structure, now_ns: int) -> dict[str, Any]:
    """The event dict of an expanded record (after the fallback patched it, say)."""
    hdr: TfHdr = rec.hdr
    ev = _header(hdr, now_ns)
    arg_spec = eventsets.arg_spec(hdr.event_set, ev["syscall"])
    if isinstance(rec, TfExecEvent):
        args = _int_args(arg_spec, rec.iargs, ev["syscall"])
        args["filename"] = str_arg(rec.filename)
        argv: dict[str, Any] = {
            "value": [text(bytes(rec.argv[i])[: rec.arg_len[i]]) for i in range(rec.argc)]
            if rec.argv_status in _ARGV_SHOWN
            else None,
            "status": _status(rec.argv_status),
            "strategy": _strategy(rec.argv_strategy),
            "addr": hex(rec.argv_uptr),
        }
        if rec.argv_err:
            argv["error"] = _err(rec.argv_err)
        args["argv"] = argv
        ev["args"] = args
        return ev
    if isinstance(rec, TfEvent):
        args = _int_args(arg_spec, rec.iargs, ev["syscall"])
        for i, name in enumerate(arg_spec.strs):
            args[name] = str_arg(rec.str[i])
        if len(arg_spec.strs) == 1 and rec.str[1].status != Status.NONE:
            # open family: the file the returned fd names, resolved in the kernel at exit
            # (set when the name was not read at entry; compare with a mismatch status)
            args["kernel_path"] = str_arg(rec.str[1])
        if arg_spec.blob:
            args[arg_spec.blob] = blob_arg(rec.blob, arg_spec.blob_kind)
        ev["args"] = args
        return ev
    if isinstance(rec, TfVfsEvent):
        ev["args"] = _vfs_args(rec, ev["syscall"])
        return ev
    raise RecordError(f"unknown record kind {hdr.kind}")
