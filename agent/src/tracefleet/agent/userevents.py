"""user_events: discover the application events registered on this host and consume them.

A process registers an event through ``user_events_data`` (``DIAG_IOCSREG``) with the address
of a word in its own memory; the kernel sets that bit while any tracer is attached to the
tracepoint ``user_events:<name>`` and clears it when the last one detaches. In 6.12 a BPF
program on that tracepoint never runs: payloads reach only ftrace and perf buffers. So the
agent opens one perf event per CPU on the tracepoint id with ``PERF_SAMPLE_RAW`` and reads
the mmap'd rings; opening is what sets the bits, closing clears them.

First slice: records are decoded one by one in Python (``struct.unpack_from`` per field).
The syscall path's no-Python-call-per-record rule is not met here yet; bulk decoding is the
follow-up. Lost-record notices (``PERF_RECORD_LOST``) are counted as drops; perf writes one
at the first record that fits after the reader freed space, so drops show up late.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import select
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tracefleet.agent._internal.decode import WALL_CLOCK
from tracefleet.model.event import Arg, Event

EVENT_SET = "user"
GROUP = "user_events"
DEFAULT_TRACEFS = Path("/sys/kernel/tracing")

# perf_event_open(2)
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_TID = 1 << 1
PERF_SAMPLE_TIME = 1 << 2
PERF_SAMPLE_CPU = 1 << 7
PERF_SAMPLE_RAW = 1 << 10
PERF_RECORD_LOST = 2
# read(2) of the event gives its own count of records it could not write (Linux 6.0+): exact
# at any time, where the PERF_RECORD_LOST notice waits for the next record on that CPU
PERF_FORMAT_LOST = 1 << 4
PERF_RECORD_SAMPLE = 9
_PERF_FLAG_FD_CLOEXEC = 1 << 3
_USE_CLOCKID = 1 << 25  # perf_event_attr.use_clockid
_ATTR_SIZE = 128  # PERF_ATTR_SIZE_VER7: accepted by every kernel with user_events
# struct perf_event_mmap_page: data_head/tail/offset/size since 4.1
_HEAD_OFF, _TAIL_OFF, _DOFF_OFF, _DSIZE_OFF = 1024, 1032, 1040, 1048
_SAMPLE_TYPE = PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_CPU | PERF_SAMPLE_RAW

# A user_events name: the kernel takes [A-Za-z0-9_] (and a ':' suffix for multi-format
# events since 6.10 is not listed in events/): refuse anything that could escape tracefs.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")


class UserEventsError(Exception):
    """A user_events operation that cannot proceed: cause and fix in the message."""


class BadEventName(UserEventsError):
    """The name given by the user cannot be a user_event (a usage error)."""


# --------------------------------------------------------------------------------------------
# Discovery


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: str  # as the format file spells it, e.g. "u32", "char[16]", "__rel_loc char[]"
    offset: int  # in the raw record, common fields included
    size: int
    signed: bool

    @property
    def kind(self) -> str:
        """int, chars (fixed array), rel_loc, data_loc or bytes (anything else)."""
        t = self.type
        if t.startswith("__rel_loc"):
            return "rel_loc"
        if t.startswith("__data_loc"):
            return "data_loc"
        if "[" in t:
            return "chars" if t.split("[", 1)[0].strip() in ("char", "unsigned char") else "bytes"
        if self.size in (1, 2, 4, 8):
            return "int"
        return "bytes"


@dataclass(frozen=True, slots=True)
class UserEvent:
    name: str
    id: int
    fields: tuple[Field, ...]
    used_by: tuple[str, ...] = ()  # from user_events_status: ftrace, perf, other

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "fields": [{"name": f.name, "type": f.type, "size": f.size} for f in self.fields],
            "used_by": list(self.used_by),
        }


_FIELD_LINE = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>\d+);"
)


def parse_format(text: str) -> tuple[int, tuple[Field, ...]]:
    """(tracepoint id, event fields without the common_* ones) from an events/*/format file.

    `field:char msg[16]` is normalised to type `char[16]`, name `msg`."""
    tp_id = -1
    fields: list[Field] = []
    for line in text.splitlines():
        if line.startswith("ID:"):
            tp_id = int(line.split(":", 1)[1].strip())
            continue
        m = _FIELD_LINE.match(line)
        if not m:
            continue
        decl = m.group("decl").strip()
        ftype, _, name = decl.rpartition(" ")
        size = int(m.group("size"))
        if "[" in name:  # "char msg[16]" -> type char[16], name msg
            name, _, dim = name.partition("[")
            if dim == "]" and "loc" not in ftype:  # 6.12 prints "char msg[]" for char[16]
                dim = f"{size}]"
            ftype = f"{ftype}[{dim}"
        if name.startswith("common_"):
            continue
        fields.append(
            Field(
                name,
                ftype.strip(),
                int(m.group("off")),
                int(m.group("size")),
                m.group("signed") == "1",
            )
        )
    if tp_id < 0:
        raise UserEventsError("format file has no 'ID:' line: not a tracepoint format")
    return tp_id, tuple(fields)


def parse_status(text: str) -> dict[str, tuple[str, ...]]:
    """user_events_status -> {name: ("perf", ...)}; the trailing Active/Busy counts dropped."""
    out: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("Active:", "Busy:", "Max:")):
            continue
        name, _, used = line.partition("#")
        name = name.split()[0] if name.split() else ""
        if not name:
            continue
        users = used.strip().removeprefix("Used by").split()
        out[name] = tuple(users)
    return out


def available(tracefs: Path = DEFAULT_TRACEFS) -> tuple[bool, str]:
    """(True, "") when this kernel has user_events; else (False, the reason)."""
    if not (tracefs / "user_events_data").exists():
        if not (tracefs / "events").is_dir():
            return False, f"tracefs is not mounted at {tracefs} (mount -t tracefs none {tracefs})"
        return False, (
            f"{tracefs}/user_events_data is missing: this kernel ({os.uname().release}) "
            "was built without CONFIG_USER_EVENTS (Linux 6.4+)"
        )
    return True, ""


def list_events(tracefs: Path = DEFAULT_TRACEFS) -> dict[str, UserEvent]:
    """The user_events registered now, by name. Empty where the kernel lacks them."""
    ok, _ = available(tracefs)
    if not ok:
        return {}
    try:
        status = parse_status((tracefs / "user_events_status").read_text())
    except OSError:
        status = {}
    out: dict[str, UserEvent] = {}
    group = tracefs / "events" / GROUP
    names = set(status)
    if group.is_dir():
        names |= {p.name for p in group.iterdir() if p.is_dir()}
    for name in sorted(names):
        if not _NAME.match(name):
            continue
        try:
            tp_id, fields = parse_format((group / name / "format").read_text())
        except (OSError, UserEventsError, ValueError):
            continue  # unregistered between listing and reading
        out[name] = UserEvent(name, tp_id, fields, status.get(name, ()))
    return out


def find_event(name: str, tracefs: Path = DEFAULT_TRACEFS) -> UserEvent:
    if not _NAME.match(name):
        raise BadEventName(
            f"user event name {name!r} is not valid: use letters, digits and '_' "
            "(e.g. -e user:checkout_latency)"
        )
    ok, why = available(tracefs)
    if not ok:
        raise UserEventsError(f"user:{name}: {why}")
    events = list_events(tracefs)
    if name not in events:
        have = ", ".join(events) or "none"
        raise UserEventsError(
            f"user:{name}: no such user_event is registered on this host (registered: {have}); "
            "start the producer first: an event exists only while a process holds it"
        )
    return events[name]


# --------------------------------------------------------------------------------------------
# Decoding


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def decode_fields(ev: UserEvent, raw: bytes) -> dict[str, Arg]:
    """One raw record (common fields first) -> {field: Arg}. A field outside the record (a
    hostile or short write) is status "truncated" with value None, never an exception."""
    args: dict[str, Arg] = {}
    n = len(raw)
    for f in ev.fields:
        if f.offset + f.size > n:
            args[f.name] = Arg(value=None, status="truncated", strategy="perf")
            continue
        kind = f.kind
        if kind == "int":
            fmt = {1: "b", 2: "h", 4: "i", 8: "q"}[f.size]
            (v,) = struct.unpack_from("<" + (fmt if f.signed else fmt.upper()), raw, f.offset)
            args[f.name] = Arg(value=int(v), strategy="perf")
        elif kind == "chars":
            args[f.name] = Arg(value=_cstr(raw[f.offset : f.offset + f.size]), strategy="perf")
        elif kind in ("rel_loc", "data_loc"):
            (loc,) = struct.unpack_from("<I", raw, f.offset)
            start, length = loc & 0xFFFF, loc >> 16
            if kind == "rel_loc":
                start += f.offset + f.size  # relative to the end of the loc field
            if start + length > n:
                args[f.name] = Arg(value=None, status="truncated", strategy="perf")
            elif f.type.endswith("char[]"):
                args[f.name] = Arg(value=_cstr(raw[start : start + length]), strategy="perf")
            else:
                args[f.name] = Arg(value=raw[start : start + length].hex(), strategy="perf")
        else:
            args[f.name] = Arg(value=raw[f.offset : f.offset + f.size].hex(), strategy="perf")
    return args


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Perf ring consumer


class _PerfAttr(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("_rest", ctypes.c_uint8 * (_ATTR_SIZE - 96)),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def perf_event_open(tp_id: int, cpu: int, read_lost: bool = True) -> int:
    nr = _NR_PERF_EVENT_OPEN.get(os.uname().machine)
    if nr is None:
        raise UserEventsError(f"perf_event_open: unsupported architecture {os.uname().machine}")
    attr = _PerfAttr()
    attr.type = PERF_TYPE_TRACEPOINT
    attr.size = _ATTR_SIZE
    attr.config = tp_id
    attr.sample_period = 1
    attr.sample_type = _SAMPLE_TYPE
    attr.wakeup_events = 1
    attr.flags = _USE_CLOCKID  # TIME in CLOCK_MONOTONIC, the clock of every tracefleet ts_ns
    attr.clockid = time.CLOCK_MONOTONIC
    attr.read_format = PERF_FORMAT_LOST if read_lost else 0
    fd = _libc.syscall(nr, ctypes.byref(attr), -1, cpu, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0 and read_lost and ctypes.get_errno() == errno.EINVAL:
        return perf_event_open(tp_id, cpu, read_lost=False)  # before 6.0: notices only
    if fd < 0:
        e = ctypes.get_errno()
        hint = (
            "run as root or lower /proc/sys/kernel/perf_event_paranoid"
            if e in (errno.EACCES, errno.EPERM)
            else "check that the tracepoint still exists"
        )
        raise UserEventsError(
            f"perf_event_open(tracepoint {tp_id}, cpu {cpu}): {os.strerror(e)}; fix: {hint}"
        )
    return int(fd)


def _online_cpus() -> list[int]:
    try:
        text = Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


@dataclass
class _Ring:
    fd: int
    mm: mmap.mmap
    data_off: int
    data_size: int
    noticed: int = 0  # records lost, from PERF_RECORD_LOST notices read so far
    lost: int | None = None  # the event's own count (PERF_FORMAT_LOST), None if unreadable
    lost_readable: bool = True

    def read_lost(self) -> None:
        if not self.lost_readable:
            return
        try:
            data = os.read(self.fd, 16)  # {u64 value; u64 lost}
        except OSError:
            data = b""
        if len(data) == 16:
            self.lost = struct.unpack("<QQ", data)[1]
        else:  # opened without PERF_FORMAT_LOST (a kernel before 6.0): notices only
            self.lost_readable = False

    @property
    def dropped(self) -> int:
        return max(self.noticed, self.lost or 0)


@dataclass
class Counters:
    events: int = 0
    # records the rings could not hold: the events' own counts (Linux 6.0+), else the
    # PERF_RECORD_LOST notices read so far
    dropped: int = 0
    malformed: int = 0


@dataclass
class PerfTracepoint:
    """One perf ring per online CPU on a tracepoint; yields (pid, tid, time_ns, cpu, raw)."""

    tp_id: int
    pages: int = 64  # data pages per CPU (power of two)
    rings: list[_Ring] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)

    def open(self) -> None:
        page = mmap.PAGESIZE
        try:
            for cpu in _online_cpus():
                fd = perf_event_open(self.tp_id, cpu)
                try:
                    mm = mmap.mmap(fd, (1 + self.pages) * page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
                except OSError:
                    os.close(fd)
                    raise
                doff, dsize = struct.unpack_from("<QQ", mm, _DOFF_OFF)
                self.rings.append(_Ring(fd, mm, doff or page, dsize or self.pages * page))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for r in self.rings:  # losses no notice reported yet are counted too
            r.read_lost()
        self._count_dropped()
        for r in self.rings:
            r.mm.close()
            os.close(r.fd)
        self.rings.clear()

    def __enter__(self) -> PerfTracepoint:
        self.open()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def wait(self, timeout_s: float) -> bool:
        p = select.poll()
        for r in self.rings:
            p.register(r.fd, select.POLLIN)
        return bool(p.poll(max(0, int(timeout_s * 1000))))

    def read(self) -> Iterator[tuple[int, int, int, int, bytes]]:
        for r in self.rings:
            mm = r.mm
            (head,) = struct.unpack_from("<Q", mm, _HEAD_OFF)
            (tail,) = struct.unpack_from("<Q", mm, _TAIL_OFF)
            size = r.data_size
            while tail < head:
                pos = tail % size
                hdr = self._bytes(r, pos, 8)
                rtype, _misc, rsize = struct.unpack("<IHH", hdr)
                if rsize < 8:  # corrupt header: skip the rest rather than spin
                    self.counters.malformed += 1
                    tail = head
                    break
                rec = self._bytes(r, pos, rsize)
                tail += rsize
                if rtype == PERF_RECORD_LOST:
                    r.noticed += struct.unpack_from("<Q", rec, 16)[0]
                elif rtype == PERF_RECORD_SAMPLE:
                    # TID, TIME, CPU, RAW in sample_type bit order
                    pid, tid, ts, cpu, _res, rawlen = struct.unpack_from("<IIQIII", rec, 8)
                    if 36 + rawlen > rsize:  # the raw data follows its u32 size at 32
                        self.counters.malformed += 1
                        continue
                    self.counters.events += 1
                    yield pid, tid, ts, cpu, bytes(rec[36 : 36 + rawlen])
            struct.pack_into("<Q", mm, _TAIL_OFF, tail)
            r.read_lost()
            self._count_dropped()

    def _count_dropped(self) -> None:
        self.counters.dropped = sum(r.dropped for r in self.rings)

    @staticmethod
    def _bytes(r: _Ring, pos: int, n: int) -> bytes:
        start = r.data_off + pos
        end = r.data_off + r.data_size
        if start + n <= end:
            return r.mm[start : start + n]
        first = r.mm[start:end]
        return first + r.mm[r.data_off : r.data_off + n - len(first)]


class UserEventConsumer:
    """Consume one user_event: while open, every registered process has its bit set."""

    def __init__(self, name: str, tracefs: Path = DEFAULT_TRACEFS, pages: int = 64) -> None:
        self.event = find_event(name, tracefs)
        self.perf = PerfTracepoint(self.event.id, pages)

    def open(self) -> None:
        self.perf.open()

    def close(self) -> None:
        self.perf.close()

    def __enter__(self) -> UserEventConsumer:
        self.open()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def counters(self) -> Counters:
        return self.perf.counters

    def poll(self, timeout_s: float) -> list[Event]:
        self.perf.wait(timeout_s)
        out: list[Event] = []
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        # TIME is CLOCK_MONOTONIC (use_clockid): the syscall path's offset to wall time
        offset = WALL_CLOCK.offset_at(now)
        comms: dict[int, str] = {}  # one /proc read per pid and batch, not per record
        for pid, tid, ts, _cpu, raw in self.perf.read():
            if pid not in comms:
                comms[pid] = _comm(pid)
            out.append(
                Event(
                    ts_ns=ts,
                    event_set=EVENT_SET,
                    syscall=self.event.name,
                    pid=pid,
                    tid=tid,
                    comm=comms[pid],
                    ret=0,
                    args=decode_fields(self.event, raw),
                    time_ns=ts + offset,
                    delivery_latency_ns=max(0, now - ts),
                    strategy="perf",
                )
            )
        return out
