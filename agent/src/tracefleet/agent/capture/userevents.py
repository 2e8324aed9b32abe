"""user_events: discover the application events registered on this host and consume them.

A process registers an event through ``user_events_data`` (``DIAG_IOCSREG``) with the address
of a word in its own memory; the kernel sets that bit while any tracer is attached to the
tracepoint ``user_events:<name>`` and clears it when the last one detaches. In 6.12 a BPF
program on that tracepoint never runs: payloads reach only ftrace and perf buffers. So the
agent opens one perf event per CPU on the tracepoint id with ``PERF_SAMPLE_RAW`` and reads
the mmap'd rings; opening is what sets the bits, closing clears them.

A ring is drained in one call per poll by compiled code where libtfring.so is built
(``tf_perf_drain``, agent/native/fastring.c: samples into a fixed-layout index and a packed
payload buffer, lost notices counted), and the batch is split into columns with strided
memoryviews; without the library the rings are walked in Python, record by record (same
results: tests/unit/test_userevents.py). Payloads are decoded per batch (``BatchDecoder``: one
struct call per record for all of its fixed fields, compiled once per event); building each
Event is still Python per record.
Drops are the kernel's per-event lost counts (``PERF_FORMAT_LOST``), read after each read
and before the rings close.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import logging
import mmap
import operator
import os
import random
import re
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracefleet.agent.capture.contain import ErrorCounter
from tracefleet.agent.capture.decode import WALL_CLOCK
from tracefleet.agent.capture.engine import CaptureEngine, SetStatus
from tracefleet.model.event import Arg, Event

log = logging.getLogger("tracefleet.agent.userevents")

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
PERF_FORMAT_LOST = 1 << 4  # read() gives {value, lost}: samples the ring had no room for (6.0+)
PERF_RECORD_LOST = 2
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


# element sizes of the fixed arrays a user_event can declare (the format's size is the array's)
_ELEM_SIZE = {"char": 1, "unsigned char": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
              "u32": 4, "int": 4, "unsigned int": 4, "s64": 8, "u64": 8, "long": 8,
              "unsigned long": 8}  # fmt: skip

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
            elem = _ELEM_SIZE.get(ftype.strip())
            if "loc" in ftype:
                # a __rel_loc/__data_loc array is variable: 6.12 prints its unset length
                # too ("__rel_loc char note[1669504]" once in CI), which made it look like a
                # byte array and its strings came out in hex
                dim = "]"
            elif elem and size % elem == 0:
                # the dimension from size: 6.12 prints a registered char[16] as "char msg[]",
                # once as "char msg[1669504]" (apparently a length user_events leaves unset in
                # the field, printed by the format file); size is right
                dim = f"{size // elem}]"
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


MAX_REPORTED = 100  # registered events per report to the controller (NodeReport)
_TRACERS = ("ftrace", "perf", "other")  # the kernel's "Used by" words


def discovery_report(
    tracefs: Path = DEFAULT_TRACEFS, attached: frozenset[str] = frozenset(),
    cap: int = MAX_REPORTED,
) -> dict[str, Any]:  # fmt: skip
    """What is registered on this host, for the controller: {available, reason, events:
    [{name, used_by, attached}], total}. One read of user_events_status (no format files:
    this runs every report interval). The kernel does not say how many processes registered
    an event, so no count is given. At most ``cap`` events, those in ``attached`` first;
    ``total`` counts them all, so a capped list says so."""
    ok, why = available(tracefs)
    if not ok:
        return {"available": False, "reason": why, "events": [], "total": 0}
    path = tracefs / "user_events_status"
    try:
        status = parse_status(path.read_text())
    except OSError as e:
        return {"available": True, "reason": f"cannot read {path}: {e.strerror or e}",
                "events": [], "total": 0}  # fmt: skip
    names = sorted((n for n in status if _NAME.match(n)), key=lambda n: (n not in attached, n))
    events = [
        {"name": n, "used_by": [u for u in status[n] if u in _TRACERS], "attached": n in attached}
        for n in names[: max(0, cap)]
    ]
    return {"available": True, "reason": "", "events": events, "total": len(names)}


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


_INT_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}


class BatchDecoder:
    """Decodes a batch of one event's records: the whole fixed part of a record (every
    field, the loc words included) in one ``struct`` call compiled once per event, instead
    of one call per field; records too short for it, and formats a struct cannot express,
    go through decode_fields (same results, tests/unit/test_userevents.py)."""

    def __init__(self, ev: UserEvent) -> None:
        self.ev = ev
        self.fields = tuple(sorted(ev.fields, key=lambda f: f.offset))
        fmt, pos, ok = "<", 0, True
        for f in self.fields:
            if f.offset < pos:
                ok = False  # overlapping fields: not a layout a struct can express
                break
            if f.offset > pos:
                fmt += f"{f.offset - pos}x"
            kind = f.kind
            if kind == "int":
                code = _INT_CODES[f.size]
                fmt += code if f.signed else code.upper()
            elif kind in ("rel_loc", "data_loc"):
                ok = ok and f.size == 4
                fmt += "I"
            else:
                fmt += f"{f.size}s"
            pos = f.offset + f.size
        self._struct = struct.Struct(fmt) if ok else None
        self._end = pos
        self._kinds = tuple(f.kind for f in self.fields)

    def decode(self, raws: Sequence[bytes]) -> list[dict[str, Arg]]:
        st = self._struct
        if st is None:
            return [decode_fields(self.ev, r) for r in raws]
        unpack, end, fields, kinds = st.unpack_from, self._end, self.fields, self._kinds
        out: list[dict[str, Arg]] = []
        for raw in raws:
            if len(raw) < end:
                out.append(decode_fields(self.ev, raw))
                continue
            args: dict[str, Arg] = {}
            n = len(raw)
            for f, kind, v in zip(fields, kinds, unpack(raw), strict=True):
                if kind == "int":
                    args[f.name] = Arg(value=v, strategy="perf")
                elif kind == "chars":
                    args[f.name] = Arg(value=_cstr(v), strategy="perf")
                elif kind == "bytes":
                    args[f.name] = Arg(value=v.hex(), strategy="perf")
                else:
                    start, length = v & 0xFFFF, v >> 16
                    if kind == "rel_loc":
                        start += f.offset + f.size
                    if start + length > n:
                        args[f.name] = Arg(value=None, status="truncated", strategy="perf")
                    elif f.type.endswith("char[]"):
                        args[f.name] = Arg(value=_cstr(raw[start : start + length]),
                                           strategy="perf")  # fmt: skip
                    else:
                        args[f.name] = Arg(value=raw[start : start + length].hex(),
                                           strategy="perf")  # fmt: skip
            out.append(args)
        return out


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


def perf_event_open(tp_id: int, cpu: int, pid: int = -1, read_lost: bool = True) -> int:
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
    if read_lost:
        attr.read_format = PERF_FORMAT_LOST
    fd = _libc.syscall(nr, ctypes.byref(attr), pid, cpu, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        if read_lost and e == errno.EINVAL:  # before 6.0: LOST records only
            return perf_event_open(tp_id, cpu, pid, read_lost=False)
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
    pin: Any = None  # ctypes view of mm (its address for the compiled reader); freed first


# --- the compiled reader: tf_perf_drain in agent/native/fastring.c (libtfring.so) ----------
_ENTRY_SIZE = 32  # struct tf_perf_entry: u32 pid, tid; u64 time; u32 cpu, raw_off, raw_len, pad
_MIN_SAMPLE = 40  # smallest PERF_RECORD_SAMPLE in a ring (36 bytes, 8-aligned)
_drain: tuple[Any, str] | None = None
_drain_lock = threading.Lock()


def compiled_reader_status() -> tuple[bool, str]:
    """(the compiled perf-ring reader is usable, why). It is tf_perf_drain in libtfring.so
    (`make native`); TRACEFLEET_FASTRING=off turns it off too. Without it the rings are
    walked in Python (one step per record)."""
    global _drain
    with _drain_lock:
        if _drain is None:
            _drain = _load_drain()
            if _drain[0] is None:
                log.info("user_events perf rings: Python reader: %s", _drain[1])
        return _drain[0] is not None, _drain[1]


def _load_drain() -> tuple[Any, str]:
    from tracefleet.agent.capture import fastring

    if fastring.switched_off():
        return None, f"disabled by {fastring.ENV}={os.environ[fastring.ENV]}"
    lib, why = fastring.open_library()
    if lib is None:
        return None, why
    try:
        fn = lib.tf_perf_drain
    except AttributeError:
        return None, f"{why} lacks tf_perf_drain (rebuild: make native)"
    vp, u64 = ctypes.c_void_p, ctypes.c_uint64
    fn.argtypes = [vp, u64, u64, vp, ctypes.c_size_t, vp, ctypes.c_size_t, ctypes.POINTER(u64)]
    fn.restype = ctypes.c_long
    return fn, f"compiled reader {why}"


@dataclass
class PerfBatch:
    """The samples of one read, by column (same order in each)."""

    pids: list[int] = field(default_factory=list)
    tids: list[int] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    cpus: list[int] = field(default_factory=list)
    raws: list[bytes] = field(default_factory=list)

    def extend(self, other: PerfBatch) -> None:
        self.pids += other.pids
        self.tids += other.tids
        self.times += other.times
        self.cpus += other.cpus
        self.raws += other.raws

    def __len__(self) -> int:
        return len(self.pids)


@dataclass
class Counters:
    events: int = 0
    # samples the rings had no room for: the kernel's own count per event (PERF_FORMAT_LOST,
    # exact at any time); before 6.0 the PERF_RECORD_LOST notices, which come late
    dropped: int = 0
    malformed: int = 0


@dataclass
class PerfTracepoint:
    """One perf ring per online CPU on a tracepoint (or one ring for one process, ``pid``);
    yields (pid, tid, time_ns, cpu, raw)."""

    tp_id: int
    pages: int = 64  # data pages per CPU (power of two)
    pid: int = -1  # -1: every process
    rings: list[_Ring] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    _record_lost: int = 0  # PERF_RECORD_LOST totals (what the kernel reported in-band)
    _format_lost: bool = True  # every ring reads its lost count (PERF_FORMAT_LOST)
    # "auto": the compiled reader where libtfring.so has it, else Python; "compiled" (an
    # error without it) or "python" force one
    reader: str = "auto"
    drain_calls: int = 0  # tf_perf_drain calls (one per ring and read unless a batch filled)
    _fn: Any = None
    _idx: bytearray = field(default_factory=bytearray)
    _raw: bytearray = field(default_factory=bytearray)
    _cap: int = 0  # entries _idx holds

    def open(self) -> None:
        self._choose_reader()
        page = mmap.PAGESIZE
        try:
            for cpu in _online_cpus() if self.pid == -1 else [-1]:
                fd = perf_event_open(self.tp_id, cpu, self.pid)
                try:
                    mm = mmap.mmap(fd, (1 + self.pages) * page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
                except OSError:
                    os.close(fd)
                    raise
                doff, dsize = struct.unpack_from("<QQ", mm, _DOFF_OFF)
                self.rings.append(_Ring(fd, mm, doff or page, dsize or self.pages * page))
            self._attach_reader()
        except BaseException:
            self.close()
            raise

    def _choose_reader(self) -> None:
        if self.reader not in ("auto", "compiled", "python"):
            raise ValueError(f"reader {self.reader!r}: use auto, compiled or python")
        self._fn = None
        if self.reader != "python":
            ok, why = compiled_reader_status()
            if ok and _drain is not None:
                self._fn = _drain[0]
            elif self.reader == "compiled":
                raise UserEventsError(f"compiled perf-ring reader unavailable: {why}")

    def _attach_reader(self) -> None:
        """The compiled reader's view of each mapping and its output buffers: one call
        drains a whole ring (as many entries and raw bytes as a ring can hold)."""
        if self._fn is None or not self.rings:
            return
        for r in self.rings:
            r.pin = ctypes.c_char.from_buffer(r.mm)
        size = max(r.data_size for r in self.rings)
        self._cap = size // _MIN_SAMPLE + 1
        self._idx = bytearray(self._cap * _ENTRY_SIZE)
        self._raw = bytearray(size)

    def _update_lost(self) -> None:
        """counters.dropped from the kernel's per-event lost counts: exact now, not at the
        next record that fits (as PERF_RECORD_LOST is)."""
        total = 0
        for r in self.rings if self._format_lost else ():
            try:
                data = os.read(r.fd, 16)
            except OSError:
                data = b""
            if len(data) != 16:  # opened without PERF_FORMAT_LOST (before 6.0)
                self._format_lost = False
                break
            total += struct.unpack("<QQ", data)[1]
        self.counters.dropped = total if self._format_lost else self._record_lost

    def close(self) -> None:
        """Close the rings; records not read by then are gone, so read() first. The lost
        counts are read before the fds close: delivered + dropped == written."""
        if self.rings:
            self._update_lost()
        for r in self.rings:
            r.pin = None  # the mapping cannot close while a ctypes view exports it
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
        """Every sample in the rings as (pid, tid, time_ns, cpu, raw); read_batch() gives
        them by column."""
        b = self.read_batch()
        return zip(b.pids, b.tids, b.times, b.cpus, b.raws, strict=True)

    def read_batch(self, payloads: bool = True) -> PerfBatch:
        """Every sample in the rings, by column; lost and malformed records counted.
        ``payloads=False``: raws left empty (counting needs only the stamps)."""
        if self._fn is None:
            out = PerfBatch()
            for pid, tid, ts, cpu, raw in self._walk():
                out.pids.append(pid)
                out.tids.append(tid)
                out.times.append(ts)
                out.cpus.append(cpu)
                if payloads:
                    out.raws.append(raw)
            return out
        return self._read_compiled(payloads)

    def _read_compiled(self, payloads: bool) -> PerfBatch:
        out = PerfBatch()
        counts = (ctypes.c_uint64 * 4)()
        idx = (ctypes.c_char * len(self._idx)).from_buffer(self._idx)
        raw = (ctypes.c_char * len(self._raw)).from_buffer(self._raw)
        try:
            for r in self.rings:
                more, calls = True, 0
                # each call consumes a record at least: a ring holds at most this many
                while more and calls <= r.data_size // _MIN_SAMPLE:
                    calls += 1
                    counts[:] = [0, 0, 0, 0]
                    n = self._fn(ctypes.addressof(r.pin), r.data_off, r.data_size, idx,
                                 self._cap, raw, len(self._raw), counts)  # fmt: skip
                    self.drain_calls += 1
                    if n < 0:
                        raise UserEventsError(f"tf_perf_drain: {os.strerror(-n)}")
                    self._record_lost += counts[0]
                    self.counters.malformed += counts[1]
                    more = bool(counts[3]) and n > 0
                    if n:
                        out.extend(self._columns(n, counts[2] if payloads else -1))
        finally:
            del idx, raw  # release the exports of the bytearrays
        self.counters.events += len(out)
        self._update_lost()
        return out

    def _columns(self, n: int, raw_used: int) -> PerfBatch:
        """n entries of the index, by column: strided views, no Python step per record
        (raw_used -1: no payloads)."""
        mv = memoryview(self._idx)[: n * _ENTRY_SIZE]
        u32, u64 = mv.cast("I"), mv.cast("Q")
        raws: list[bytes] = []
        if raw_used >= 0:
            offs = u32[5::8].tolist()
            ends = list(map(operator.add, offs, u32[6::8].tolist()))
            blob = bytes(memoryview(self._raw)[:raw_used])
            raws = list(map(blob.__getitem__, map(slice, offs, ends)))
        b = PerfBatch(u32[0::8].tolist(), u32[1::8].tolist(), u64[1::4].tolist(),
                      u32[4::8].tolist(), raws)  # fmt: skip
        u32.release()
        u64.release()
        mv.release()
        return b

    def _walk(self) -> Iterator[tuple[int, int, int, int, bytes]]:
        """The Python reader: the rings walked one record at a time."""
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
                    self._record_lost += struct.unpack_from("<Q", rec, 16)[0]
                elif rtype == PERF_RECORD_SAMPLE:
                    # TID, TIME, CPU, RAW in sample_type bit order
                    pid, tid, ts, cpu, _res, rawlen = struct.unpack_from("<IIQIII", rec, 8)
                    if 36 + rawlen > rsize:  # the raw data follows its u32 size at 32
                        self.counters.malformed += 1
                        continue
                    self.counters.events += 1
                    yield pid, tid, ts, cpu, bytes(rec[36 : 36 + rawlen])
            struct.pack_into("<Q", mm, _TAIL_OFF, tail)
        self._update_lost()

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
        self.reported_drops = 0  # counters.dropped already handed out as aggregates
        self.decoder = BatchDecoder(self.event)

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
        b = self.perf.read_batch()
        decoded = self.decoder.decode(b.raws)  # the whole batch at once
        comms = {pid: _comm(pid) for pid in set(b.pids)}  # one /proc read per pid and batch
        for pid, tid, ts, args in zip(b.pids, b.tids, b.times, decoded, strict=True):
            out.append(
                Event(
                    ts_ns=ts,
                    event_set=EVENT_SET,
                    syscall=self.event.name,
                    pid=pid,
                    tid=tid,
                    comm=comms[pid],
                    ret=0,
                    args=args,
                    time_ns=ts + offset,
                    delivery_latency_ns=max(0, now - ts),
                    strategy="perf",
                )
            )
        return out


def latency_histogram(now_ns: int, stamps: Sequence[int]) -> Any:
    """The Histogram of max(0, now - ts) seconds over a batch, built in bulk (no Python step
    per record); same counts as one observe() per record."""
    from tracefleet.agent.capture.engine import Histogram

    h = Histogram()
    ns = map(max, itertools.repeat(0), map(now_ns.__sub__, stamps))  # stamps after now: 0
    h.observe_many(map(operator.truediv, ns, itertools.repeat(1e9)))
    return h


# --------------------------------------------------------------------------------------------
# Fleet control: user:NAME sets beside the BPF engine's


USER_SET_PREFIX = "user:"
# every user set counts its events under this one key: a bounded label, whatever the names
USER_SYSCALL_KEY = "event"
RETRY_SECONDS = 5.0  # how often an enabled event that is not registered yet is looked for


def _user_agg() -> Any:
    from tracefleet.agent.capture.engine import SetAggregate

    return SetAggregate()


class UserEventsEngine(CaptureEngine):
    """A CaptureEngine that adds ``user:NAME`` sets to another engine (the BPF one).

    Enabling ``user:NAME`` opens the event's perf rings (the kernel sets the enable bit in
    every registered process); disabling closes them (the bits clear). One thread reads all
    rings; each event counts in the set's aggregate (delivered, perf's lost records as
    dropped, latency), is sampled at the rule's rate and goes to the engine's sinks (export).
    Everything else is the inner engine's: every CaptureEngine member is delegated here by
    name (a default of the contract would hide the inner's), the rest by __getattr__."""

    def __init__(
        self, inner: CaptureEngine, tracefs: Path = DEFAULT_TRACEFS, pages: int = 64
    ) -> None:
        self.inner = inner
        self.tracefs = tracefs
        self.pages = pages
        self._lock = threading.Lock()
        self._consumers: dict[str, UserEventConsumer] = {}
        self._rates: dict[str, float] = {}
        self._errors: dict[str, str] = {}
        self._wanted: set[str] = set()  # user sets the desired state enables
        self._agg: dict[str, Any] = {}  # set -> SetAggregate of this interval
        self._cum: dict[str, Any] = {}  # set -> SetAggregate since start (metrics, export)
        self._samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=10_000)
        self._sinks: list[Callable[[dict[str, Any]], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._names: list[str] = []  # the user sets of the last desired state
        # a set attached after apply() returned its status (registered late): reported by
        # status_updates(), else the node would show the stale error until the next change
        self._status_changed = False

    def __getattr__(self, name: str) -> Any:  # drain, start, accounting...: the inner's
        return getattr(self.inner, name)

    # ---- CaptureEngine ---------------------------------------------------------------------
    def event_sets(self) -> Sequence[str]:
        return list(self.inner.event_sets())

    def capabilities(self, **kw: Any) -> Mapping[str, Any]:
        caps = dict(self.inner.capabilities(**kw))
        ok, why = available(self.tracefs)
        caps["user_events"] = {"available": ok, "reason": why}
        return caps

    def apply(self, desired: Mapping[str, Any]) -> Sequence[Any]:
        mine = {n: c for n, c in desired.items() if n.startswith(USER_SET_PREFIX)}
        statuses = list(self.inner.apply({n: c for n, c in desired.items() if n not in mine}))
        with self._lock:
            for name in list(self._consumers):
                cfg = mine.get(name)
                if cfg is None or not cfg.enabled:
                    c = self._consumers.pop(name)
                    self._read(c)  # what is left, then the lost counts, then the bits clear
                    c.close()
                    self._count_drops_of(c)
            self._wanted = {n for n, cfg in mine.items() if cfg.enabled}
            for name, cfg in mine.items():
                self._rates[name] = cfg.sample_rate
                self._errors.pop(name, None)
                if cfg.enabled and name not in self._consumers:
                    self._try_open(name)
            self._names = list(mine)
            self._status_changed = False
            statuses += self._statuses()
        if self._wanted:
            self._start()
        return statuses

    def _statuses(self) -> list[Any]:
        """Under _lock: the SetStatus of every user set of the desired state."""
        from tracefleet.agent.capture.engine import SetStatus

        out = []
        for name in self._names:
            on = name in self._consumers
            out.append(SetStatus(name, on, on, "perf", self._errors.get(name, "")))
        return out

    def status_updates(self) -> list[Any]:
        """The user sets' statuses if one changed since apply() (or the last call) returned
        them, else []."""
        with self._lock:
            if not self._status_changed:
                return []
            self._status_changed = False
            return self._statuses()

    def user_events_report(self, cap: int = MAX_REPORTED) -> dict[str, Any]:
        """discovery_report() with the events this engine has attached marked."""
        with self._lock:
            attached = frozenset(c.event.name for c in self._consumers.values())
        return discovery_report(self.tracefs, attached, cap)

    def _try_open(self, name: str) -> None:
        """Under _lock: open ``name``'s rings, or keep why not in _errors."""
        try:
            c = UserEventConsumer(name.removeprefix(USER_SET_PREFIX), self.tracefs, self.pages)
            c.open()
        except (UserEventsError, OSError) as e:
            self._errors[name] = str(e)
            return
        self._errors.pop(name, None)
        self._consumers[name] = c

    def collect(self) -> Any:
        agg = self.inner.collect()
        with self._lock:
            self._count_drops()
            mine, self._agg = self._agg, {}
        for name, sa in mine.items():
            agg.sets[name] = sa
        return agg

    def totals(self) -> dict[str, Any]:
        out = dict(self.inner.totals())
        with self._lock:
            self._count_drops()
            out.update(self._cum)
        return out

    def sample_events(self, limit: int) -> list[dict[str, Any]]:
        out = list(self.inner.sample_events(limit))
        while self._samples and len(out) < limit:
            out.append(self._samples.popleft())
        return out

    def add_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        self.inner.add_sink(sink)
        self._sinks = [*self._sinks, sink]

    def remove_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        self.inner.remove_sink(sink)
        self._sinks = [s for s in self._sinks if s is not sink]

    def stop_and_drain(self) -> int:
        """Stop reading, hand what is still in the rings to the sinks, then the inner
        engine's; the rings stay open (the bits set) until close()."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for c in self._consumers.values():
                self._read(c)
        return int(self.inner.stop_and_drain())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for c in self._consumers.values():
                self._read(c)  # what is still in the rings, before they are freed
                c.close()  # reads the kernel's lost counts first
                self._count_drops_of(c)
            self._consumers.clear()
        self.inner.close()

    # ---- the inner engine's (its consumer, counters and BPF statistics) --------------------
    def statuses(self) -> Sequence[SetStatus] | None:
        return self.inner.statuses()

    def health(self) -> tuple[bool, str]:
        return self.inner.health()

    def consumer(self) -> tuple[bool, str] | None:
        return self.inner.consumer()

    @property
    def errors(self) -> ErrorCounter | None:
        return self.inner.errors

    def kernel_missed(self, name: str) -> tuple[int, int] | None:
        return self.inner.kernel_missed(name)

    @property
    def fallback_rejected(self) -> Mapping[tuple[str, str], int] | None:
        return self.inner.fallback_rejected

    @property
    def namespace_events(self) -> Mapping[tuple[str, str], int]:
        return self.inner.namespace_events

    def attribution_unknown(self) -> Mapping[str, int] | None:
        return self.inner.attribution_unknown()

    def exe_unknown(self) -> Mapping[str, int] | None:
        return self.inner.exe_unknown()

    def enable_run_stats(self) -> bool:
        return self.inner.enable_run_stats()

    @property
    def bpf_stats_enabled(self) -> bool:
        return self.inner.bpf_stats_enabled

    def program_stats(self) -> Sequence[tuple[str, str, int, int]]:
        return self.inner.program_stats()

    # ---- consumer --------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tf-user-events", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        retry_at = time.monotonic() + RETRY_SECONDS
        while not self._stop.is_set():
            with self._lock:
                if time.monotonic() >= retry_at:
                    # an event enabled before any process registered it: opened once one has
                    retry_at = time.monotonic() + RETRY_SECONDS
                    for name in sorted(self._wanted - set(self._consumers)):
                        self._try_open(name)
                        if name in self._consumers:
                            self._status_changed = True
                fds = [r.fd for c in self._consumers.values() for r in c.perf.rings]
            if not fds:
                self._stop.wait(0.2)
                continue
            p = select.poll()
            for fd in fds:
                p.register(fd, select.POLLIN)
            p.poll(200)
            with self._lock:
                for c in self._consumers.values():
                    try:
                        self._read(c)
                    except Exception as e:  # one bad record must not end the consumer
                        log.warning("user_events %s: %s", c.event.name, e)

    def _set_agg(self, table: dict[str, Any], name: str) -> Any:
        sa = table.get(name)
        if sa is None:
            sa = table[name] = _user_agg()
        return sa

    def _read(self, c: UserEventConsumer) -> None:
        """Under _lock: the records in ``c``'s rings into aggregates, samples and sinks."""
        name = USER_SET_PREFIX + c.event.name
        rate = self._rates.get(name, 0.0)
        decode = bool(self._sinks) or rate > 0
        # nobody reads the events (no export, no sampling): count them, decode nothing
        evs = c.poll(0) if decode else []
        stamps = [e.ts_ns for e in evs] if decode else c.perf.read_batch(payloads=False).times
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for table in (self._agg, self._cum):
            sa = self._set_agg(table, name)
            sa.delivered += len(stamps)
            if stamps:
                by = sa.events_by_syscall
                by[USER_SYSCALL_KEY] = by.get(USER_SYSCALL_KEY, 0) + len(stamps)
        if stamps:  # the batch's latencies, added to the interval and to the totals
            h = latency_histogram(now, stamps)
            for table in (self._agg, self._cum):
                lat = self._set_agg(table, name).latency
                lat.add(h)
        self._count_drops()
        for ev in evs:
            d = ev.to_json()
            if rate >= 1.0 or (rate > 0 and random.random() < rate):
                self._samples.append(d)
            for sink in self._sinks:
                try:
                    sink(d)
                except Exception as e:
                    log.warning("user_events %s: sink: %s", name, e)

    def _count_drops(self) -> None:
        """Under _lock: perf's lost-record counts since the last call, as drops."""
        for c in self._consumers.values():
            self._count_drops_of(c)

    def _count_drops_of(self, c: UserEventConsumer) -> None:
        name = USER_SET_PREFIX + c.event.name
        seen = c.counters.dropped
        new = seen - c.reported_drops
        if new:
            c.reported_drops = seen
            self._set_agg(self._agg, name).dropped += new
            self._set_agg(self._cum, name).dropped += new
