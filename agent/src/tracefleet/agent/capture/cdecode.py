"""The compiled decode: records -> the event dicts of decode.py, in batches.

The record walker of libtfring.so (agent/native/jsonfmt.c: one reading of a record, the one
the jsonl formatter renders as text) with the tables handed over from their Python homes
(jsonfmt.JsonFormatter's, without an output), and its Python emitter, the ``_tfdecode``
extension (agent/native/pydecode.c, built by ``make native`` against the interpreter's
headers into this package; no compiler at run time). The compiled ring consumer's batch is
decoded in one call into the dicts ``decode_record`` makes (same keys in the same order, same
values, same types; the executable resolved as ExeResolver resolves it); the consumer runs
only the per-event steps not compiled (attribution, filters, samples, sinks) on them. A record
the walker declines (malformed, a vfs path that needs the mount table, an unknown id, a lost
argument for the user-space fallback, ...) goes to RingConsumer.on_record as before, the
reason counted (``counters``).

Where the extension is missing or refuses to load, or ``TRACEFLEET_DECODE=off``, ``status()``
says why (logged once) and the consumer decodes in Python.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
import time
from typing import Any

from tracefleet.agent.capture.jsonfmt import DECLINED, FormatterError, JsonFormatter

log = logging.getLogger("tracefleet.agent")

ENV = "TRACEFLEET_DECODE"  # unset or "on": the compiled decode where it loads; "off": Python
_ON, _OFF = ("on", "1", "yes"), ("off", "0", "no")
# the decoder's reasons beyond the walker's (pydecode.c's DEC_*), in its order
_DECLINED = (*DECLINED, "raw", "fallback", "nomem")

# records per decode_batch call: a slice's dicts reach the sinks and are freed while hot in
# the cache (a whole batch of dicts alive at once cost twice as much per event, measured)
SLICE = 64

_status: tuple[bool, str] | None = None
_lock = threading.Lock()


class SettingError(ValueError):
    """TRACEFLEET_DECODE holds a value that is neither on nor off."""


class DecodeError(RuntimeError):
    """The compiled decode cannot be used (why is in the message)."""


def requested() -> bool:
    """Whether the compiled decode is wanted: unset means yes (Python decodes, said once, where
    it does not load)."""
    env = os.environ.get(ENV, "")
    if not env or env.lower() in _ON:
        return True
    if env.lower() in _OFF:
        return False
    raise SettingError(f"{ENV}={env!r} is not a setting: use one of {', '.join(_ON)} (the "
                       f"compiled decode, the default) or {', '.join(_OFF)} (Python)")  # fmt: skip


def _load() -> tuple[bool, str]:
    try:
        if not requested():
            return False, f"disabled by {ENV}={os.environ[ENV]}"
    except SettingError as e:
        return False, str(e)
    try:
        from tracefleet.agent.capture import _tfdecode
    except ImportError as e:
        return False, f"the _tfdecode extension does not load ({e}; run `make native`)"
    return True, f"compiled decode {_tfdecode.__file__}"


def status() -> tuple[bool, str]:
    """(compiled decode usable, why): loaded once; the fallback is logged once."""
    global _status
    with _lock:
        if _status is None:
            _status = _load()
            if not _status[0]:
                log.warning("event decode: Python (one call per record): %s", _status[1])
        return _status


def _walker(lib: ctypes.CDLL) -> tuple[int, int, int, int, int, int]:
    """libtfring.so's walker: its ABI, its view's size and the addresses the extension calls."""
    try:
        lib.tf_walk_abi.restype = ctypes.c_int
        lib.tf_walk_view_size.restype = ctypes.c_size_t
        addr = [ctypes.cast(getattr(lib, n), ctypes.c_void_p).value or 0
                for n in ("tf_walk", "tf_walk_exe", "tf_walk_kept", "tf_fast_count")]  # fmt: skip
    except AttributeError as e:
        raise DecodeError(f"library lacks the record walker: {e} (rebuild: make native)") from e
    return (int(lib.tf_walk_abi()), int(lib.tf_walk_view_size()), *addr)  # type: ignore[return-value]


def sample_records() -> list[bytes]:
    """Made-up records of every kind (the self-check): openat with flag names, a hostile path
    and a lost kernel path; connect to an IPv6 address; execveat with argv; vfs_close."""
    from tracefleet.agent.capture.decode import encode_record
    from tracefleet.agent.kernel.abi import (
        EventSetId,
        Kind,
        Status,
        Syscall,
        TfEvent,
        TfExecEvent,
        TfStr,
        TfVfsEvent,
    )  # fmt: skip

    def hdr(rec: Any, kind: Kind, sc: Syscall, set_id: EventSetId) -> None:
        h = rec.hdr
        h.ts_ns, h.exit_ns, h.cgroup_id, h.ret = 5_000_000_123, 5_000_009_999, 7, -2
        h.pid, h.tid = 42, 43
        h.kind, h.syscall, h.event_set, h.strategy = int(kind), int(sc), int(set_id), 3
        h.comm, h.ctx_ok, h.ppid, h.uid, h.gid = b'a"\\\x01\xff', 1, 1, 0, 0

    def put(s: Any, data: bytes, status: Status = Status.OK, err: int = 0) -> None:
        s.uptr, s.len, s.status, s.strategy, s.err = 0x7F00, len(data), int(status), 3, err
        ctypes.memmove(ctypes.addressof(s) + TfStr.data.offset, data, len(data))

    out = []
    ev = TfEvent()
    hdr(ev, Kind.SYSCALL, Syscall.OPENAT, EventSetId.FILE)
    ev.iargs[0], ev.iargs[2], ev.iargs[3] = -100, 0o2101101 | (1 << 40), 0o644
    put(ev.str[0], b'/t/\xff\xc3\xa9"\\\n\x1f\x7f\xf0\x9f\x98\x80')
    put(ev.str[1], b"", Status.LOST, -14)
    out.append(encode_record(ev))
    ev = TfEvent()
    hdr(ev, Kind.SYSCALL, Syscall.CONNECT, EventSetId.NET)
    ev.iargs[0], ev.iargs[2] = 3, 28
    put(ev.blob, socket.AF_INET6.to_bytes(2, "little") + b"\x00\x50" + bytes(4)
        + bytes.fromhex("20010db8000000000000000000000001") + bytes(4))  # fmt: skip
    out.append(encode_record(ev))
    ex = TfExecEvent()
    hdr(ex, Kind.EXEC, Syscall.EXECVEAT, EventSetId.EXEC)
    ex.iargs[0], ex.iargs[4] = -100, 0x1000
    put(ex.filename, b"/bin/true")
    ex.argv_uptr, ex.argc, ex.argv_status, ex.argv_strategy = 0x7FF0, 2, int(Status.OK), 3
    for i, a in enumerate((b"true", b"\xff x")):
        ex.arg_len[i] = len(a)
        ctypes.memmove(ctypes.addressof(ex) + TfExecEvent.argv.offset + i * len(ex.argv[0]),
                       a, len(a))  # fmt: skip
    out.append(encode_record(ex))
    vf = TfVfsEvent()
    hdr(vf, Kind.VFS, Syscall.VFS_CLOSE, EventSetId.VFS)
    vf.ino, vf.dev, vf.bytes_read, vf.reads, vf.pos, vf.fstype = 12, 0x800001, 4096, 2, 9, b"ext4"
    vf.path_kind = 1
    put(vf.path, b"/var/log/x")
    out.append(encode_record(vf))
    return out


class BatchDecoder:
    """The compiled decode of one compiled consumer (``fast``: its struct tf_fast address, into
    whose aggregates decoded records are counted; None: not counted, for tests). ``exe_fd``:
    tf_exes (-1: every exe unknown). Not thread-safe: the consumer calls it from its polling
    thread, under its lock."""

    def __init__(self, lib: ctypes.CDLL, fast: int | None, exe_fd: int = -1,
                 self_check: bool = True) -> None:  # fmt: skip
        ok, why = status()
        if not ok:
            raise DecodeError(why)
        from tracefleet.agent.capture import _tfdecode

        try:
            # the walker's tables, from their one home (no output: fd -1)
            self.tables = JsonFormatter(lib, -1, need_ident=False, exe_fd=exe_fd)
        except FormatterError as e:
            raise DecodeError(f"the walker's tables: {e}") from e
        try:
            families = (int(socket.AF_INET), int(socket.AF_INET6), int(socket.AF_UNIX))
            self._dec: Any = _tfdecode.Decoder(_walker(lib), self.tables.ptr, fast, families,
                                          self.tables)  # fmt: skip
            if self_check:
                self._self_check()
        except Exception as e:
            self.tables.close()
            raise DecodeError(f"compiled decode: {e}") from e

    def _self_check(self) -> None:
        """Made-up records of each kind decoded both ways: used only if the dicts are equal."""
        from tracefleet.agent.capture import decode

        offset = decode.WALL_CLOCK.offset_at(time.monotonic_ns())
        for raw in sample_records():
            got = self._dec.decode(raw, 9_000_000_000, offset)
            if isinstance(got, int):
                raise DecodeError(f"a sample record declined ({_DECLINED[got]})")
            want, _ = decode.decode_record(raw, 9_000_000_000)
            want["time_ns"] = want["ts_ns"] + offset
            if got != want or list(got) != list(want):
                raise DecodeError(f"the compiled dict differs from Python's: {got!r} != "
                                  f"{want!r}")  # fmt: skip
        self.tables._lib.tf_jfmt_exe_reset(self.tables.ptr)

    def decode_batch(
        self, address: int, length: int, deliver: bool, start: int = 0, max_items: int = SLICE
    ) -> tuple[list[Any], list[dict[str, Any]], int]:
        """Up to ``max_items`` records of the compiled consumer's batch (address, length) from
        byte ``start``: (items in ring order: an event dict, or (raw, receive time, flags) for
        on_record; the dicts sampled; where the next records start, ``length``: none left).
        ``deliver`` false: only sampled records become dicts, the rest are counted."""
        from tracefleet.agent.capture.decode import WALL_CLOCK

        offset = WALL_CLOCK.offset_at(time.monotonic_ns())
        items, sampled, nxt = self._dec.decode_batch(address, length, offset, deliver, start,
                                                     max_items)  # fmt: skip
        return items, sampled, nxt

    def decode(self, raw: bytes, now_ns: int, offset_ns: int) -> dict[str, Any] | str:
        """One record: its dict, or why it is left to Python (for tests)."""
        got = self._dec.decode(raw, now_ns, offset_ns)
        return _DECLINED[got] if isinstance(got, int) else got

    def counters(self) -> dict[str, Any]:
        decoded, counted, declined = self._dec.counters()
        why = {k: n for k, n in zip(_DECLINED, declined, strict=True) if n}
        return {"decoded": decoded, "counted": counted, "declined": why}

    def exe_counters(self) -> dict[str, int]:
        """Events this decode made with an unknown exe, per cause (ExeResolver's CAUSES)."""
        return self.tables.exe_counters()[0]

    def close(self) -> None:
        """Free the tables; the decoder is dropped first (it must not read them after)."""
        self._dec = _Closed()
        self.tables.close()


class _Closed:
    """A closed BatchDecoder's decoder: every call raises, none reads freed tables."""

    def __getattr__(self, name: str) -> Any:
        raise DecodeError("the compiled decode is closed")
