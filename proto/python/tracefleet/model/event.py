"""Typed event: what the agent decodes from one ring buffer record.

JSON shape (one object per event; the agent's ``capture -o jsonl`` and the controller CLI's
``events -o json`` print exactly this)::

    {"ts_ns", "time", "time_ns", "duration_ns", "delivery_latency_ns", "event_set",
     "syscall", "pid", "tid", "ppid", "uid", "gid", "exe", "comm", "ret", "cgroup_id", "strategy",
     ["node"], ["attribution", "container_id", "pod", "namespace", "pod_uid", "container"],
     "args": {name: {"value": ..., "status": "ok|recovered|mismatch|reread|lost|truncated|torn",
                     "strategy": "...", ["addr": "0x7f..."], ["error": "EFAULT"],
                     ["names": ["O_RDONLY", ...]], ["kind": "d_path|..."], ...}}}

``value`` is an int, a string, a list of strings (argv), an object (socket address,
open_how) or null when nothing was captured; a flag set keeps its raw int in ``value`` and
adds its ``names``. ``ppid``/``uid``/``gid`` are null when the record did not carry them.
``exe`` is the full path of the process's executable (what ``/proc/PID/exe`` names), as the
kernel walked it the first time the node saw that file (identified by inode, device and
generation): a file renamed since keeps the name it had then; one deleted before it was first
seen ends in `` (deleted)``, as does an exec'd memfd (``/memfd:NAME (deleted)``). Exec events
carry the new image once the exec succeeded. Null when unknown: a kernel thread, a path not
resolved (counted), an older agent; never a guessed path.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tracefleet.model.names import OUTCOMES

STATUSES = OUTCOMES  # an argument's status is the outcome it is counted under
WORKLOAD_FIELDS = ("container_id", "pod", "namespace", "pod_uid", "container")


@dataclass(frozen=True, slots=True)
class SocketAddress:
    family: str  # inet, inet6, unix, or the number as text
    address: str = ""
    port: int = 0
    path: str = ""
    raw: bytes = b""

    def to_json(self) -> dict[str, Any]:
        if self.family in ("inet", "inet6"):
            return {"family": self.family, "address": self.address, "port": self.port}
        if self.family == "unix":
            return {"family": "unix", "path": self.path}
        return {"family": self.family, "raw": self.raw.hex()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SocketAddress:
        return cls(
            family=str(d.get("family", "")),
            address=str(d.get("address", "")),
            port=int(d.get("port", 0)),
            path=str(d.get("path", "")),
            raw=bytes.fromhex(str(d.get("raw", ""))),
        )


@dataclass(frozen=True, slots=True)
class OpenHow:
    flags: int
    mode: int
    resolve: int

    def to_json(self) -> dict[str, Any]:
        return {"flags": self.flags, "mode": self.mode, "resolve": self.resolve}


@dataclass(frozen=True, slots=True)
class FlagSet:
    """An integer argument made of flags: the raw value and its names."""

    raw: int
    names: tuple[str, ...]


ArgValue = int | str | list[str] | SocketAddress | OpenHow | FlagSet | None


@dataclass(slots=True)
class Arg:
    value: ArgValue
    status: str = "ok"
    strategy: str = ""
    error: str = ""  # errno name of the failed read
    addr: int | None = None  # user address read; None for registers and kernel values
    redacted: bool = False
    path_kind: str = ""  # vfs paths: d_path, walk, mount-relative, as-passed, at-open
    # JSON-only details the API does not carry (vfs mount, mount_relative)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        v = self.value
        out: dict[str, Any] = {}
        if isinstance(v, FlagSet):
            out["value"] = v.raw
        elif isinstance(v, SocketAddress | OpenHow):
            out["value"] = v.to_json()
        elif isinstance(v, list):
            out["value"] = list(v)
        else:
            out["value"] = v
        out["status"] = self.status
        out["strategy"] = self.strategy
        if self.addr is not None:
            out["addr"] = hex(self.addr)
        if self.error:
            out["error"] = self.error
        if isinstance(v, FlagSet):
            out["names"] = list(v.names)
        if self.path_kind:
            out["kind"] = self.path_kind
        if self.redacted:
            out["redacted"] = True
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Arg:
        raw = d.get("value")
        value: ArgValue
        if raw is None or type(raw) is str:
            value = raw
        elif type(raw) is int:
            names = d.get("names")
            value = raw if names is None else FlagSet(raw, tuple(str(n) for n in names))
        elif isinstance(raw, list):
            value = [str(x) for x in raw]
        elif isinstance(raw, Mapping):
            if "family" in raw:
                value = SocketAddress.from_json(raw)
            elif "flags" in raw:
                value = OpenHow(int(raw["flags"]), int(raw.get("mode", 0)),
                                int(raw.get("resolve", 0)))  # fmt: skip
            else:
                value = str(dict(raw))
        elif isinstance(raw, int):  # bool, int subclasses
            value = int(raw)
        else:
            value = str(raw)
        addr = d.get("addr")
        extra = {k: v for k, v in d.items() if k not in _ARG_KEYS} if len(d) > 3 else {}
        return cls(
            value,
            d.get("status", "ok"),
            d.get("strategy", ""),
            d.get("error", ""),
            int(addr, 16) if addr else None,
            d.get("redacted", False),
            d.get("kind", ""),
            extra,
        )


_ARG_KEYS = frozenset({"value", "status", "strategy", "addr", "error", "names", "kind",
                       "redacted"})  # fmt: skip


def time_text(time_ns: int) -> str | None:
    """RFC 3339 UTC with microseconds; None when unknown (0)."""
    if not time_ns:
        return None
    t = dt.datetime.fromtimestamp(time_ns // 1_000_000_000, tz=dt.UTC)
    t = t.replace(microsecond=time_ns % 1_000_000_000 // 1000)
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Event:
    ts_ns: int  # syscall entry, CLOCK_MONOTONIC of the node
    event_set: str
    syscall: str
    pid: int
    tid: int
    comm: str
    ret: int
    args: dict[str, Arg] = field(default_factory=dict)
    time_ns: int = 0  # syscall entry, wall clock (Unix ns); 0 = unknown (older agent)
    duration_ns: int = 0  # syscall entry -> exit
    delivery_latency_ns: int = 0  # syscall entry -> decoded in the agent
    cgroup_id: int = 0
    strategy: str = ""  # strategy of the set's loaded programs
    ppid: int | None = None
    uid: int | None = None
    gid: int | None = None
    exe: str | None = None  # full path of the process's executable; None = unknown
    node: str = ""  # set by the controller
    # workload identity (agent/.../workload.py); "" = not known
    attribution: str = ""  # host, container, pod, unknown; "" = not attributed at all
    container_id: str = ""
    pod: str = ""
    namespace: str = ""
    pod_uid: str = ""
    container: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ts_ns": self.ts_ns,
            "time": time_text(self.time_ns),
            "time_ns": self.time_ns,
            "duration_ns": self.duration_ns,
            "delivery_latency_ns": self.delivery_latency_ns,
            "event_set": self.event_set,
            "syscall": self.syscall,
            "pid": self.pid,
            "tid": self.tid,
            "ppid": self.ppid,
            "uid": self.uid,
            "gid": self.gid,
            "exe": self.exe,
            "comm": self.comm,
            "ret": self.ret,
            "cgroup_id": self.cgroup_id,
            "strategy": self.strategy,
        }
        if self.node:
            out["node"] = self.node
        if self.attribution:
            out["attribution"] = self.attribution
            for k in WORKLOAD_FIELDS:
                out[k] = getattr(self, k)
        out["args"] = {k: a.to_json() for k, a in self.args.items()}
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Event:
        def opt(k: str) -> int | None:
            v = d.get(k)
            return None if v is None else int(v)

        return cls(
            ts_ns=int(d.get("ts_ns", 0)),
            event_set=str(d.get("event_set", "")),
            syscall=str(d.get("syscall", "")),
            pid=int(d.get("pid", 0)),
            tid=int(d.get("tid", 0)),
            comm=str(d.get("comm", "")),
            ret=int(d.get("ret", 0)),
            args={
                str(k): Arg.from_json(a) if isinstance(a, Mapping) else Arg(value=str(a))
                for k, a in (d.get("args") or {}).items()
            },
            time_ns=int(d.get("time_ns", 0)),
            duration_ns=int(d.get("duration_ns", 0)),
            delivery_latency_ns=int(d.get("delivery_latency_ns", 0)),
            cgroup_id=int(d.get("cgroup_id", 0)),
            strategy=str(d.get("strategy", "")),
            ppid=opt("ppid"),
            uid=opt("uid"),
            gid=opt("gid"),
            exe=None if d.get("exe") is None else str(d["exe"]),
            node=str(d.get("node", "")),
            attribution=str(d.get("attribution") or ""),
            **{k: str(d.get(k) or "") for k in WORKLOAD_FIELDS},
        )


# ---- flag names ----------------------------------------------------------------------------
# Decided where the event is decoded (the agent's host: O_* values differ between
# architectures), shipped as names.


def _consts(*names: str) -> tuple[tuple[str, int], ...]:
    return tuple((n, int(getattr(os, n))) for n in names if hasattr(os, n))


_O_BITS = _consts(
    "O_CREAT", "O_EXCL", "O_NOCTTY", "O_TRUNC", "O_APPEND", "O_NONBLOCK", "O_DSYNC",
    "O_DIRECT", "O_LARGEFILE", "O_DIRECTORY", "O_NOFOLLOW", "O_NOATIME", "O_CLOEXEC",
    "O_PATH",
)  # fmt: skip
_O_SYNC = getattr(os, "O_SYNC", 0)
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_AT_BITS = (
    ("AT_SYMLINK_NOFOLLOW", 0x100), ("AT_REMOVEDIR", 0x200), ("AT_SYMLINK_FOLLOW", 0x400),
    ("AT_NO_AUTOMOUNT", 0x800), ("AT_EMPTY_PATH", 0x1000), ("AT_STATX_FORCE_SYNC", 0x2000),
    ("AT_STATX_DONT_SYNC", 0x4000),
)  # fmt: skip
_RENAME_BITS = (("RENAME_NOREPLACE", 1), ("RENAME_EXCHANGE", 2), ("RENAME_WHITEOUT", 4))
_SOCK_BITS = (("SOCK_NONBLOCK", 0o4000), ("SOCK_CLOEXEC", 0o2000000))
_MSG_BITS = (
    ("MSG_OOB", 1), ("MSG_PEEK", 2), ("MSG_DONTROUTE", 4), ("MSG_DONTWAIT", 0x40),
    ("MSG_EOR", 0x80), ("MSG_CONFIRM", 0x800), ("MSG_NOSIGNAL", 0x4000), ("MSG_MORE", 0x8000),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FlagTable:
    """How a flags argument is named: with ``accmode``, the access mode (raw & 3) first, by
    its index in ``accmode``; then each of ``bits`` in order whose bits are all set, removed
    once named; then what is left, in hex. The one definition of flag names (the compiled
    jsonl formatter is handed these tables)."""

    accmode: tuple[str, ...]  # () or the names of raw & 3 == 0, 1, 2, 3
    bits: tuple[tuple[str, int], ...]

    def names(self, raw: int) -> list[str]:
        raw &= (1 << 64) - 1
        out: list[str] = []
        rest = raw
        if self.accmode:
            out.append(self.accmode[raw & 3])
            rest = raw & ~3
        for name, bit in self.bits:
            if bit and rest & bit == bit:
                out.append(name)
                rest &= ~bit
        if rest:
            out.append(hex(rest))
        return out


_OPEN_TABLE = FlagTable(
    ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE"),
    (("O_TMPFILE", _O_TMPFILE), ("O_SYNC", _O_SYNC), *_O_BITS),
)
_OPEN_CALLS = frozenset({"open", "openat", "vfs_open"})
_AT_CALLS = frozenset({"unlinkat", "newfstatat", "statx", "execveat", "fchmodat"})
_TABLES: tuple[tuple[frozenset[str], FlagTable], ...] = (
    (_OPEN_CALLS, _OPEN_TABLE),
    (_AT_CALLS, FlagTable((), _AT_BITS)),
    (frozenset({"renameat2"}), FlagTable((), _RENAME_BITS)),
    (frozenset({"accept4"}), FlagTable((), _SOCK_BITS)),
    (frozenset({"sendto"}), FlagTable((), _MSG_BITS)),
)


def flag_table(syscall: str, arg: str) -> FlagTable | None:
    """The flag table of this argument, or None if it is not a flag set."""
    if arg != "flags":
        return None
    for calls, table in _TABLES:
        if syscall in calls:
            return table
    return None


def flag_names(syscall: str, arg: str, raw: int) -> tuple[str, ...] | None:
    """Names of a flags argument, or None if this argument is not a flag set."""
    table = flag_table(syscall, arg)
    return None if table is None else tuple(table.names(raw))
