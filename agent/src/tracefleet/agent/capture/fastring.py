"""The compiled ring-buffer consumer (agent/native/fastring.c, built by ``make native`` into
this package as libtfring.so; loaded with ctypes, no compiler at run time).

It owns libbpf's ring_buffer poll loop. Per record, in C: the header-only aggregates (records
per set and syscall, the delivery-latency histogram); a record is copied into a batch only
when Python needs it decoded (a sink, a sample, a lost argument for the user-space fallback,
a set or syscall id the C side was not told about). Python drains the batch once per poll and
folds the C aggregates into the engine's interval once per poll: aggregate-only capture makes
no Python call per record, and the poll itself runs without the GIL.

The C code holds no layout: header offsets (abi.TfHdr), histogram bounds
(engine.LATENCY_BUCKETS_SECONDS) and the status-byte offsets of arguments come from here.
Where the library is missing or refuses to load, ``consumer_status()`` says why and the
engine uses libbpf.RingBuffer (one Python call per record).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tracefleet.agent.capture.contain import UNKNOWN_SET, ErrorCounter
from tracefleet.agent.capture.decode import (
    STRH_LEN_OFF,
    STRH_STATUS_OFF,
    SYSCALL_NAMES,
    TF_STRH_SIZE,
)
from tracefleet.agent.capture.engine import LATENCY_BUCKETS_SECONDS, Aggregates, SetAggregate
from tracefleet.agent.capture.eventsets import BY_ID
from tracefleet.agent.kernel import libbpf
from tracefleet.agent.kernel.abi import (
    TF_SET_MAX,
    Status,
    Syscall,
    TfEvent,
    TfExecEvent,
    TfHdr,
    TfVfsEvent,
)

log = logging.getLogger("tracefleet.agent")

ENV = "TRACEFLEET_FASTRING"  # unset or "on": compiled consumer; "off": Python; a path: that library
LIB_NAME = "libtfring.so"
ABI = 4
_MAX_BOUNDS, _MAX_KINDS, _MAX_HEADS = 64, 8, 8

# per-set flags and per-entry flags (fastring.c)
SET_DELIVER, SET_SAMPLE, SET_FALLBACK, SET_SAMPLE_ALL, SET_JSONL = 1, 2, 4, 8, 16
REC_SAMPLE, REC_FALLBACK, REC_RAW = 1, 2, 4
_ENTRY = struct.Struct("=IIQ")  # size, flags, receive time (CLOCK_MONOTONIC ns)
_DOUBLE = struct.Struct("=d")
_U64 = struct.Struct("=Q")


class _Params(ctypes.Structure):
    _fields_ = [
        ("abi", ctypes.c_uint32),
        ("hdr_size", ctypes.c_uint32),
        ("off_ts", ctypes.c_uint32),
        ("off_kind", ctypes.c_uint32),
        ("off_syscall", ctypes.c_uint32),
        ("off_set", ctypes.c_uint32),
        ("nsets", ctypes.c_uint32),
        ("nsyscalls", ctypes.c_uint32),
        ("nbounds", ctypes.c_uint32),
        ("lost_status", ctypes.c_uint32),
        ("batch_bytes", ctypes.c_uint32),
        ("reserve_bytes", ctypes.c_uint32),
        ("bounds", ctypes.c_double * _MAX_BOUNDS),
        ("strh_size", ctypes.c_uint32),
        ("strh_len_off", ctypes.c_uint32),
        ("strh_status_off", ctypes.c_uint32),
        ("lost_start", ctypes.c_uint32 * _MAX_KINDS),
        ("lost_heads", ctypes.c_uint32 * _MAX_KINDS),
        ("lost_argv", ctypes.c_uint32 * _MAX_KINDS),
    ]


_vp = ctypes.c_void_p
_lib: ctypes.CDLL | None = None
_status: tuple[bool, str] | None = None
_lock = threading.Lock()


_ON, _OFF = ("on", "1", "yes"), ("off", "0", "no")


class SettingError(ValueError):
    """TRACEFLEET_FASTRING holds a value that is neither on, off nor a library path."""


def library_path() -> Path:
    env = os.environ.get(ENV, "")
    if "/" in env:
        return Path(env)
    return Path(__file__).with_name(LIB_NAME)


def switched_off() -> bool:
    """TRACEFLEET_FASTRING says off (0, no): no compiled code at all, user_events' reader
    included."""
    return os.environ.get(ENV, "").lower() in _OFF


def open_library() -> tuple[ctypes.CDLL | None, str]:
    """libtfring.so opened (after the libbpf.so.1 it links against), or None and why."""
    path = library_path()
    if not path.exists():
        return None, f"{path} not built (run `make native`)"
    try:
        libbpf.lib()
        return ctypes.CDLL(str(path), use_errno=True), f"{path}"
    except (OSError, libbpf.LibbpfError) as e:
        return None, f"{path} does not load: {e}"


def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        if not requested() and os.environ.get(ENV):
            return None, f"disabled by {ENV}={os.environ[ENV]}"
    except SettingError as e:
        return None, str(e)
    lib, why = open_library()
    if lib is None:
        return None, why
    path = library_path()
    try:
        lib.tf_fast_abi.restype = ctypes.c_int
        if lib.tf_fast_abi() != ABI:
            return None, f"{path} has ABI {lib.tf_fast_abi()}, want {ABI} (rebuild: make native)"
        lib.tf_fast_new.restype = _vp
        lib.tf_fast_new.argtypes = [ctypes.POINTER(_Params), ctypes.c_int]
        lib.tf_fast_free.argtypes = [_vp]
        lib.tf_fast_free.restype = None
        lib.tf_fast_add.argtypes = [_vp, ctypes.c_int]
        lib.tf_fast_set.argtypes = [_vp, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32]
        lib.tf_fast_set_jsonl.argtypes = [_vp, _vp]
        lib.tf_fast_set_jsonl.restype = None
        lib.tf_fast_flags.argtypes = [_vp, ctypes.c_uint32]
        lib.tf_fast_flags.restype = ctypes.c_uint32
        lib.tf_fast_abort.argtypes = [_vp]
        lib.tf_fast_abort.restype = None
        lib.tf_fast_resume.argtypes = [_vp]
        lib.tf_fast_resume.restype = None
        lib.tf_fast_poll.argtypes = [_vp, ctypes.c_int]
        lib.tf_fast_poll.restype = ctypes.c_long
        lib.tf_fast_full.argtypes = [_vp]
        lib.tf_fast_batch.argtypes = [_vp, ctypes.POINTER(ctypes.c_size_t)]
        lib.tf_fast_batch.restype = _vp
        lib.tf_fast_reset.argtypes = [_vp]
        lib.tf_fast_reset.restype = None
        lib.tf_fast_counters.argtypes = [_vp, ctypes.POINTER(ctypes.c_uint64)]
        lib.tf_fast_counters.restype = None
        lib.tf_fast_take.argtypes = [_vp, ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        lib.tf_fast_take.restype = ctypes.c_long
        lib.tf_fast_count.argtypes = [_vp, _vp, ctypes.c_size_t, ctypes.c_uint64]
        lib.tf_fast_count.restype = None
    except AttributeError as e:
        return None, f"{path} lacks a symbol: {e} (rebuild: make native)"
    return lib, f"compiled consumer {path}"


def requested() -> bool:
    """Whether the compiled consumer is wanted: unset means yes (it falls back to the Python
    one, said once, where it does not load). Any value other than on, off or a path raises
    SettingError: a typo must not quietly choose a consumer."""
    env = os.environ.get(ENV, "")
    if not env or env.lower() in _ON or "/" in env:  # on, or a library path
        return True
    if env.lower() in _OFF:
        return False
    raise SettingError(
        f"{ENV}={env!r} is not a setting: use one of {', '.join(_ON)} (the compiled ring "
        f"consumer, the default), {', '.join(_OFF)} (the Python one), or a path containing "
        f"'/' to a {LIB_NAME}"
    )


def consumer_status() -> tuple[bool, str]:
    """(compiled consumer usable, why): loaded once; the fallback is logged once."""
    global _lib, _status
    with _lock:
        if _status is None:
            _lib, why = _load()
            _status = (_lib is not None, why)
            if _lib is None:
                log.warning("ring buffer consumer: Python (one call per record): %s", why)
        return _status


def library() -> ctypes.CDLL | None:
    """The loaded library (None where it does not load): the jsonl formatter is in it too."""
    consumer_status()
    return _lib


def params(lost_heads: Mapping[int, tuple[int, int, bool]], batch_bytes: int = 4 << 20) -> _Params:
    """The layout the C side works with, from abi.py and engine.py (one definition)."""
    p = _Params()
    p.abi = ABI
    p.hdr_size = ctypes.sizeof(TfHdr)
    p.off_ts = TfHdr.ts_ns.offset
    p.off_kind = TfHdr.kind.offset
    p.off_syscall = TfHdr.syscall.offset
    p.off_set = TfHdr.event_set.offset
    p.nsets = TF_SET_MAX
    p.nsyscalls = max(int(s) for s in Syscall) + 1
    if len(LATENCY_BUCKETS_SECONDS) > _MAX_BOUNDS:
        raise ValueError(f"at most {_MAX_BOUNDS} histogram bounds in the compiled consumer")
    p.nbounds = len(LATENCY_BUCKETS_SECONDS)
    for i, b in enumerate(LATENCY_BUCKETS_SECONDS):
        p.bounds[i] = b
    p.lost_status = int(Status.LOST)
    p.strh_size, p.strh_len_off, p.strh_status_off = TF_STRH_SIZE, STRH_LEN_OFF, STRH_STATUS_OFF
    for kind, (start, heads, argv) in lost_heads.items():
        if not 0 <= kind < _MAX_KINDS or not start > 0 or not 0 <= heads <= _MAX_HEADS:
            raise ValueError(f"string heads of record kind {kind} do not fit: {start}, {heads}")
        p.lost_start[kind], p.lost_heads[kind], p.lost_argv[kind] = start, heads, int(argv)
    biggest = max(ctypes.sizeof(t) for t in (TfEvent, TfExecEvent, TfVfsEvent))
    p.reserve_bytes = biggest + _ENTRY.size + 8
    p.batch_bytes = max(batch_bytes, 4 * p.reserve_bytes)
    return p


OnRecord = Callable[[bytes, int, int], None]  # raw, receive time, flags (-1: Python decides)


class FastRing:
    """libbpf.RingBuffer's interface (add, poll, consume, abort, close) on the compiled
    consumer. ``on_record(raw, now_ns, flags)`` runs for each record in the batch;
    ``aggregates()`` returns the interval the C aggregates are folded into after each poll.
    Not thread-safe: the consumer serialises calls (RingConsumer._rb_lock)."""

    def __init__(
        self,
        map_fd: int,
        on_record: OnRecord,
        aggregates: Callable[[], Aggregates],
        lost_heads: Mapping[int, tuple[int, int, bool]],
        errors: ErrorCounter | None = None,
    ):
        ok, why = consumer_status()
        if not ok or _lib is None:
            raise RuntimeError(why)
        self._lib = _lib
        self._on_record = on_record
        self._aggregates = aggregates
        self._params = params(lost_heads)
        words = TF_SET_MAX * (4 + self._params.nbounds + 1 + 2 * self._params.nsyscalls)
        self._take_buf = (ctypes.c_uint64 * words)()
        self._config: dict[int, tuple[int, int]] = {}
        self._errors = errors
        self._seen_bad = (0, 0)  # short records, no memory: reported to errors so far
        self._aborted = False
        # the compiled decode (cdecode.BatchDecoder), the consumer's batch callback and
        # whether every record is wanted decoded (a sink): set_decoder
        self._decoder: Any = None
        self._on_events: Callable[[list[Any], list[dict[str, Any]]], None] | None = None
        self._deliver: Callable[[], bool] = lambda: True
        ptr = self._lib.tf_fast_new(ctypes.byref(self._params), map_fd)
        if not ptr:
            err = ctypes.get_errno()
            raise libbpf.LibbpfError(-err, "create the compiled ring buffer consumer")
        self._ptr: int | None = ptr

    def add(self, map_fd: int) -> None:
        assert self._ptr
        err = self._lib.tf_fast_add(self._ptr, map_fd)
        if err < 0:
            raise libbpf.LibbpfError(err, "add a ring buffer to the consumer")

    @property
    def address(self) -> int:
        """The struct tf_fast (the compiled decode counts decoded records into it)."""
        assert self._ptr
        return int(self._ptr)

    def set_decoder(
        self,
        decoder: Any,
        on_events: Callable[[list[Any], list[dict[str, Any]]], None],
        deliver: Callable[[], bool],
    ) -> None:
        """Decode each batch with ``decoder`` (cdecode.BatchDecoder, or None: per record in
        Python) and hand it to ``on_events(items, sampled)`` in one call; ``deliver()``: whether
        records that are not sampled are wanted decoded (else only counted)."""
        self._decoder, self._on_events, self._deliver = decoder, on_events, deliver

    @property
    def decoder(self) -> Any:
        return self._decoder

    def set_jsonl(self, formatter: Any) -> None:
        """The compiled jsonl formatter (jsonfmt.JsonFormatter, or None) that writes the lines
        of the sets configured with ``jsonl``."""
        assert self._ptr
        self._lib.tf_fast_set_jsonl(self._ptr, formatter.ptr if formatter is not None else None)

    def configure(self, sets: Iterable[tuple[int, bool, float, bool, bool]]) -> None:
        """Per set (id, deliver every record, sample rate, user fallback, jsonl): which
        records the C side copies for Python; with jsonl (the jsonl output is the only reader)
        the formatter writes the line of every record it can render, and the others are
        copied. Pushed only when changed. Callers serialise it with their
        reading of that state (consumer.py's _sync_lock): a push computed from older state
        must not land after a newer one."""
        if not self._ptr:
            return
        for set_id, deliver, rate, fallback, jsonl in sets:
            flags = (SET_JSONL if jsonl else SET_DELIVER if deliver else 0) | (
                SET_FALLBACK if fallback else 0
            )
            thr = 0
            if rate >= 1.0:
                flags |= SET_SAMPLE_ALL
            elif rate > 0:
                flags |= SET_SAMPLE
                thr = min(int(rate * 2**32), 2**32 - 1)
            if self._config.get(set_id) != (flags, thr):
                self._lib.tf_fast_set(self._ptr, set_id, flags, thr)
                self._config[set_id] = (flags, thr)

    def flags(self, set_id: int) -> int:
        """The flags the C side consumes this set's records with now (SET_*)."""
        assert self._ptr
        return int(self._lib.tf_fast_flags(self._ptr, set_id))

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for a wakeup, then consume everything queued: the C side
        aggregates, Python decodes the batch (drained as often as it fills)."""
        assert self._ptr
        total = 0
        timeout = timeout_ms
        while True:
            n = self._lib.tf_fast_poll(self._ptr, timeout)
            full = self._lib.tf_fast_full(self._ptr)
            try:  # also when aborted: these records left the ring, only Python has them now
                self._drain()
            finally:
                self._fold()
            if n < 0:
                raise libbpf.LibbpfError(n, "ring buffer poll")
            total += int(n)
            if not full or self._aborted:
                return total
            timeout = -1  # the batch filled: consume the rest without waiting

    def consume(self) -> int:
        return self.poll(-1)

    def _drain(self) -> None:
        assert self._ptr
        size = ctypes.c_size_t()
        ptr = self._lib.tf_fast_batch(self._ptr, ctypes.byref(size))
        if not size.value:
            self._lib.tf_fast_reset(self._ptr)
            return
        start = 0
        if self._decoder is not None and self._on_events is not None:
            start = self._drain_decoded(ptr, size.value)
            if start >= size.value:
                return
        data = ctypes.string_at(ptr + start, size.value - start)  # one copy per batch
        self._lib.tf_fast_reset(self._ptr)  # before decoding: a failure cannot wedge it
        on_record, unpack, hsz = self._on_record, _ENTRY.unpack_from, _ENTRY.size
        off, end = 0, len(data)
        raised: BaseException | None = None
        while off < end:
            n, flags, now = unpack(data, off)
            start = off + hsz
            off = start + ((n + 7) & ~7)
            try:
                on_record(data[start : start + n], now, -1 if flags & REC_RAW else flags)
            except BaseException as e:
                # on_record contains Exception; this is a KeyboardInterrupt or SystemExit out
                # of a sink. These records have left the ring: hand the rest over, then raise
                # (stopping here lost them uncounted; the Python consumer leaves them queued)
                raised = raised or e
        if raised is not None:
            raise raised

    def _drain_decoded(self, ptr: int, size: int) -> int:
        """The batch through the compiled decode, a slice per call, each slice handed to
        on_events in one call. Returns where Python must go on (size: nothing left; less when
        the compiled decode failed, which is said once and not used again)."""
        assert self._ptr and self._on_events is not None
        start, deliver = 0, self._deliver()
        raised: BaseException | None = None
        try:
            while start < size:
                try:
                    items, sampled, nxt = self._decoder.decode_batch(ptr, size, deliver, start)
                except Exception as e:  # a fault of the compiled decode: said, then Python's
                    log.error("compiled decode failed, decoding in Python from now on: %s", e)
                    self._decoder.close()
                    self._decoder = None
                    return start  # nothing of this slice was counted: Python takes it whole
                start = nxt
                try:
                    self._on_events(items, sampled)
                except BaseException as e:
                    raised = raised or e  # as below: hand the rest over, then raise
        finally:
            if start >= size:
                self._lib.tf_fast_reset(self._ptr)
        if raised is not None:
            raise raised
        return start

    def _fold(self) -> None:
        """Move the C aggregates into the engine's current interval."""
        assert self._ptr
        buf = self._take_buf
        n = self._lib.tf_fast_take(self._ptr, buf, len(buf))
        if n > 0:
            fold(self._aggregates(), buf[:n], int(self._params.nbounds))
        c = self.counters()
        bad = (c["short"], c["nomem"])
        if bad != self._seen_bad and self._errors is not None:
            # as the Python consumer counts them: one decode failure per record
            for _ in range(bad[0] - self._seen_bad[0]):
                self._errors.count(UNKNOWN_SET, "decode", "record shorter than the header")
            for _ in range(bad[1] - self._seen_bad[1]):
                self._errors.count(UNKNOWN_SET, "decode", "no memory to copy the record")
        self._seen_bad = bad

    def counters(self) -> dict[str, int]:
        assert self._ptr
        out = (ctypes.c_uint64 * 6)()
        self._lib.tf_fast_counters(self._ptr, out)
        return {"records": out[0], "forwarded": out[1], "short": out[2], "nomem": out[3],
                "jsonl_compiled": out[4], "jsonl_python": out[5]}  # fmt: skip

    @property
    def aborted(self) -> bool:
        return self._aborted

    @aborted.setter
    def aborted(self, value: bool) -> None:
        """False: resume after abort() (the final drain); the C side's flag too."""
        self._aborted = value
        if self._ptr:
            (self._lib.tf_fast_abort if value else self._lib.tf_fast_resume)(self._ptr)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._ptr:
            self._lib.tf_fast_free(self._ptr)
            self._ptr = None


def fold(agg: Aggregates, words: Sequence[int], nbounds: int) -> None:
    """Add tf_fast_take()'s words to ``agg`` exactly as RingConsumer.on_record would have,
    record by record (same names for sets and syscalls, same buckets)."""
    i = 0
    while i < len(words):
        set_id, delivered, sum_bits, ntouched = words[i : i + 4]
        i += 4
        hist = words[i : i + nbounds + 1]
        i += nbounds + 1
        spec = BY_ID.get(set_id)
        name = spec.name if spec else str(set_id)
        sa = agg.sets.get(name)
        if sa is None:
            sa = agg.sets[name] = SetAggregate()
        sa.delivered += delivered
        by_sc = sa.events_by_syscall
        for _ in range(ntouched):
            sc, count = words[i], words[i + 1]
            i += 2
            scn = SYSCALL_NAMES.get(sc, str(sc))
            by_sc[scn] = by_sc.get(scn, 0) + count
        counts = sa.latency.counts
        for b, c in enumerate(hist):
            if c:
                counts[b] += c
        sa.latency.sum += _DOUBLE.unpack(_U64.pack(sum_bits))[0]
