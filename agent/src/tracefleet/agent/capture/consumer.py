"""The ring consumer: reads every loaded set's ring, counts each record into the accounting's
current interval and hands decoded events to the sinks and the sample buffer.

Per-set rings (a flood in one set cannot fill another's), all consumed by one libbpf
ring_buffer (or the compiled FastRing) in one poll; memory: loaded sets x ring_bytes. The
consumer thread (start()) polls, and once a second runs the engine's housekeeping (detach
idle sets, reap dead threads' entries) when the engine's lock is free."""

from __future__ import annotations

import collections
import ctypes
import logging
import random
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from tracefleet.agent.capture import cdecode, fastring
from tracefleet.agent.capture.accounting import Accounting
from tracefleet.agent.capture.contain import ANY_SET, UNKNOWN_SET, ErrorCounter
from tracefleet.agent.capture.decode import (
    LOST_HEADS,
    SYSCALL_NAMES,
    WALL_CLOCK,
    decode_record,
    has_lost_arg,
)
from tracefleet.agent.capture.engine import EventSink, Filters, SetAggregate
from tracefleet.agent.capture.eventsets import BY_ID, EVENT_SETS
from tracefleet.agent.capture.exe import ExeResolver
from tracefleet.agent.capture.fallback import RecordFallback
from tracefleet.agent.capture.jsonfmt import FormatterError, JsonFormatter
from tracefleet.agent.kernel import libbpf
from tracefleet.agent.kernel.abi import TfHdr

if TYPE_CHECKING:
    from tracefleet.agent.capture.enginestate import EngineOptions, SetState

log = logging.getLogger("tracefleet.agent")

_HDR_SIZE = ctypes.sizeof(TfHdr)
_HDR = struct.Struct("=Q24x8xHHB")  # ts_ns, (exit_ns, cgroup_id, ret, pid, tid), kind, syscall, set

CreateMap = Callable[[int, str, int, int, int], int]  # type, name, key, value size, entries


def _peek_header(raw: bytes) -> tuple[int, int, int]:
    ts_ns, _kind, syscall, set_id = _HDR.unpack_from(raw)
    return set_id, syscall, ts_ns


def _label(ev: dict[str, Any]) -> str:
    """The errors' label of a decoded event: its set's name, or UNKNOWN_SET."""
    name = ev.get("event_set")
    return name if name in EVENT_SETS else UNKNOWN_SET


def _prefix_ok(ev: dict[str, Any], f: Filters) -> bool:
    """The path-prefix filter for paths the kernel could not match: a vfs hook that only had
    a dentry sends the path relative to its file system, and the mount point is known here."""
    path = ev["args"].get("path", {})
    if path.get("kind") != "mount-relative" or path.get("value") is None:
        return True
    return any(str(path["value"]).startswith(p) for p in f.path_prefixes)


class RingConsumer:
    """The engine's ring consumer. ``sets`` and ``lock`` are the engine's (set state is read
    per record, without the lock); ``create_map`` makes a ring the engine owns and closes;
    ``housekeeping`` runs once a second from the consumer thread, holding ``lock``."""

    def __init__(
        self,
        opts: EngineOptions,
        sets: Mapping[str, SetState],
        acct: Accounting,
        fallback: RecordFallback,
        errors: ErrorCounter,
        create_map: CreateMap,
        housekeeping: Callable[[], None],
        lock: threading.RLock,
        exes: ExeResolver | None = None,
    ) -> None:
        self.opts = opts
        self._sets = sets
        self._acct = acct
        self._fallback = fallback
        self.errors = errors
        self._create_map = create_map
        self._housekeeping = housekeeping
        self._lock = lock
        self._exes = exes or ExeResolver(-1)
        self._sinks: list[EventSink] = []
        self._samples: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=opts.sample_buffer
        )
        self._namespaces: set[str] = set()
        self.heartbeat_ns = 0  # monotonic time of the consumer's last poll or record
        self.consumer_error = ""  # why the consumer thread ended, if it did
        self._rings: dict[str, int] = {}
        self.rb: libbpf.RingBuffer | fastring.FastRing | None = None
        self._rb_lock = threading.Lock()  # serialises ring_buffer__add with poll/consume
        self._sync_lock = threading.Lock()  # sync(): state read + push, as one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the compiled jsonl output and the sink it stands for (compiled_jsonl)
        self._jsonl: tuple[JsonFormatter, EventSink] | None = None

    # ---- rings -------------------------------------------------------------------------
    def ring_for(self, name: str) -> int:
        """The set's own ring, created (and added to the consumer) on first use."""
        if name not in self._rings:
            fd = self._create_map(libbpf.BPF_MAP_TYPE_RINGBUF, f"tf_ev_{name}"[:15], 0, 0,
                                  self.opts.ring_bytes)  # fmt: skip
            with self._rb_lock:
                if self.rb is None:
                    self.rb = self._new_consumer(fd)
                else:
                    self.rb.add(fd)
            self._rings[name] = fd
        return self._rings[name]

    def kind(self) -> tuple[bool, str]:
        """(compiled consumer in use, why): fastring where it loads, else the Python one."""
        if not self.opts.compiled_consumer:
            return False, (f"Python consumer (the compiled one is not used: {fastring.ENV}=off, "
                           "or it failed to start, as logged)")  # fmt: skip
        return fastring.consumer_status()

    def decode_kind(self) -> tuple[bool, str]:
        """(compiled decode in use, why): with the compiled consumer, where _tfdecode loads."""
        if not self.opts.compiled_decode:
            return False, (f"Python decode (the compiled one is not used: {cdecode.ENV}=off, "
                           "or it failed to start, as logged)")  # fmt: skip
        ok, why = self.kind()
        if not ok:
            return False, f"Python decode (it needs the compiled consumer: {why})"
        return cdecode.status()

    def decode_counts(self) -> dict[str, Any] | None:
        """Records of the compiled decode: decoded, counted, left to Python (and why)."""
        rb = self.rb
        if isinstance(rb, fastring.FastRing) and rb.decoder is not None:
            return dict(rb.decoder.counters())
        return None

    def _new_consumer(self, fd: int) -> libbpf.RingBuffer | fastring.FastRing:
        if self.kind()[0]:
            try:
                # the aggregates by lookup: collect() swaps the interval
                rb = fastring.FastRing(fd, self.on_record, lambda: self._acct.agg,
                                       LOST_HEADS, self.errors)  # fmt: skip
                if self._jsonl is not None:
                    rb.set_jsonl(self._jsonl[0])
                if self.decode_kind()[0]:
                    lib = fastring.library()
                    try:
                        assert lib is not None
                        dec = cdecode.BatchDecoder(lib, rb.address, self._exes.fd)
                        rb.set_decoder(dec, self.on_events, self._deliver_all)
                    except Exception as e:  # said once; Python decodes every record
                        log.warning("compiled decode failed to start, decoding in Python: %s", e)
                        self.opts.compiled_decode = False
                return rb
            except Exception as e:  # said once; the Python consumer does the same work
                log.warning("compiled ring consumer failed to start, using Python: %s", e)
                self.opts.compiled_consumer = False
        return libbpf.RingBuffer(fd, self.on_record)

    # ---- sinks and samples -------------------------------------------------------------
    def add_sink(self, sink: EventSink) -> None:
        self._sinks = [*self._sinks, sink]  # copy on write: the consumer thread iterates it
        self.sync()  # now, not at the next poll: a poll in progress sees it

    def remove_sink(self, sink: EventSink) -> None:
        self._sinks = [s for s in self._sinks if s is not sink]
        self.sync()

    def compiled_jsonl(self, fd: int, sink: EventSink) -> JsonFormatter | None:
        """Write the jsonl lines to ``fd`` from the compiled formatter while ``sink`` (which
        writes the same lines from Python, through ``JsonFormatter.write``) is the only sink:
        records it renders make no Python call. None (and ``sink`` does all the work) where
        the compiled consumer does not run or the formatter refuses (logged)."""
        lib = fastring.library()
        if lib is None or not self.kind()[0]:
            return None
        att = self.opts.attributor
        try:
            jf = JsonFormatter(lib, fd, need_ident=att is not None, exe_fd=self._exes.fd)
        except FormatterError as e:
            log.warning("compiled jsonl formatter not used: %s", e)
            return None
        if att is not None:
            # the workload fields of every cgroup known, now and after each refresh: the
            # first records of a cgroup need no Python either
            def refresh() -> None:
                jf.refresh_idents([cg for cg, _ in att.cgroups.items()], att.settled_identity)

            refresh()
            att.add_listener(refresh)
        with self._rb_lock:
            self._jsonl = (jf, sink)
            if isinstance(self.rb, fastring.FastRing):
                self.rb.set_jsonl(jf)
        self.sync()
        return jf

    def jsonl_counts(self) -> dict[str, Any] | None:
        """Lines of the compiled jsonl output: made in C, left to Python (and why)."""
        if self._jsonl is None:
            return None
        out = self._jsonl[0].counters()
        rb = self.rb
        if isinstance(rb, fastring.FastRing):
            c = rb.counters()
            out["python"] = c["jsonl_python"]
        return out

    def exe_unknown_compiled(self) -> dict[str, int]:
        """Lines the compiled jsonl output and events the compiled decode made with an unknown
        exe, per cause (ExeResolver's counts are of the records Python decoded: they add up)."""
        out = dict(self._jsonl[0].exe_counters()[0]) if self._jsonl is not None else {}
        rb = self.rb
        if isinstance(rb, fastring.FastRing) and rb.decoder is not None:
            for cause, n in rb.decoder.exe_counters().items():
                out[cause] = out.get(cause, 0) + n
        return out

    def sample_events(self, limit: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while self._samples and len(out) < limit:
            out.append(self._samples.popleft())
        return out

    # ---- per record --------------------------------------------------------------------
    def on_record(self, raw: bytes, now: int = 0, flags: int = -1) -> None:
        """Per record: aggregates from the header alone (cheap); the full decode only when
        someone reads the event (a sink, a sample) or an argument is left for the fallback.
        Every step after the header is contained (contain.py): a failure is counted per
        cause and never reaches the ring buffer's consumer. From the compiled consumer
        (fastring): its receive time, and ``flags`` saying whether it sampled the record
        and found a lost argument (-1: decide here)."""
        now = now or time.monotonic_ns()
        self.heartbeat_ns = now
        if len(raw) < _HDR_SIZE:
            self.errors.count(UNKNOWN_SET, "decode", f"record of {len(raw)} bytes")
            return
        set_id, syscall, ts_ns = _peek_header(raw)
        spec = BY_ID.get(set_id)
        name = spec.name if spec else str(set_id)
        label = name if spec else UNKNOWN_SET
        st = self._sets.get(name)
        if flags >= 0:
            fallback = st is not None and st.user_fallback and bool(flags & fastring.REC_FALLBACK)
            sample = st is not None and bool(flags & fastring.REC_SAMPLE)
        else:
            fallback = st is not None and st.user_fallback and has_lost_arg(raw)
            sample = (
                st is not None
                and st.sample_rate > 0
                and (st.sample_rate >= 1.0 or random.random() < st.sample_rate)
            )
        ev: dict[str, Any] | None = None
        if self._sinks or sample or fallback:
            try:
                ev, rec = decode_record(raw, now)
            except Exception as e:  # unusable: counted as a decode failure, not delivered
                self.errors.count(label, "decode", e)
                if spec is not None:  # passed = delivered + ... + decode_errors
                    self._acct.agg.sets.setdefault(name, SetAggregate()).decode_errors += 1
                return
        aggs = self._acct.agg.sets
        agg = aggs.get(name)
        if agg is None:
            agg = aggs[name] = SetAggregate()
        agg.delivered += 1
        sc = SYSCALL_NAMES.get(syscall, str(syscall))
        agg.events_by_syscall[sc] = agg.events_by_syscall.get(sc, 0) + 1
        agg.latency.observe(max(0, now - ts_ns) / 1e9)
        if self._counts_namespaces():
            try:
                self._count_namespace(name, raw)
            except Exception as e:
                self.errors.count(label, "attribution", e)
        if ev is None:
            return
        if fallback:
            ev = self._fallback.event(ev, rec, name, now)
        try:
            ev["exe"] = self._exes.path(rec.hdr)
        except Exception as e:  # unknown, never a crash or a lost event
            self.errors.count(label, "exe", e)
        self._deliver(ev, label, st, sample)

    def _deliver(self, ev: dict[str, Any], label: str, st: SetState | None, sample: bool
                 ) -> None:  # fmt: skip
        """The steps after the decode (and the executable): workload attribution, the path
        prefix filter, the sample buffer, the sinks."""
        if self.opts.attributor is not None:
            try:
                self.opts.attributor.annotate(ev)
                if self._jsonl is not None:
                    self._settle_identity(int(ev["cgroup_id"]))
            except Exception as e:
                self.errors.count(label, "attribution", e)
        if st is not None and st.filters.path_prefixes:
            try:
                if not _prefix_ok(ev, st.filters):
                    return
            except Exception as e:  # fail closed: the filter scopes what leaves the engine
                self.errors.count(label, "filter", e)
                return
        if sample:
            try:
                self._samples.append(ev)
            except Exception as e:
                self.errors.count(label, "sample", e)
        for sink in self._sinks:
            try:
                sink(ev)
            except Exception as e:
                self.errors.count(label, "sink", e)

    # ---- per batch (the compiled decode) ------------------------------------------------
    def _deliver_all(self) -> bool:
        """Whether the compiled decode makes the dict of every record in a batch (else only
        of those sampled): a sink reads them, or their namespaces are counted."""
        return bool(self._sinks) or self._counts_namespaces()

    def _counts_namespaces(self) -> bool:
        """Each event's cgroup is counted per namespace (a budget, and an attributor)."""
        return bool(self.opts.namespace_budget and self.opts.attributor is not None)

    def on_events(self, items: list[Any], sampled: list[dict[str, Any]]) -> None:
        """A batch of the compiled decode (FastRing with a cdecode.BatchDecoder), in ring
        order: the event dicts made in C (decoded, the exe resolved, counted into the
        aggregates there), and (raw, receive time, flags) of each record left to Python,
        which on_record handles whole. Per dict, what is not compiled: the namespace count,
        attribution, the path prefix filter, samples, the sinks (_deliver)."""
        self.heartbeat_ns = time.monotonic_ns()
        on_record, sinks, sets = self.on_record, self._sinks, self._sets
        count_ns = self._counts_namespaces()
        simple = (not sampled and not count_ns and self.opts.attributor is None
                  and not any(st.filters.path_prefixes for st in sets.values()))  # fmt: skip
        sample_ids = {id(ev) for ev in sampled} if sampled else set()
        raised: BaseException | None = None
        for ev in items:
            try:
                if ev.__class__ is tuple:
                    on_record(*ev)
                elif simple:  # only the sinks: no per-set state to read
                    for sink in sinks:
                        try:
                            sink(ev)
                        except Exception as e:
                            self.errors.count(_label(ev), "sink", e)
                else:
                    name = ev["event_set"]
                    label = _label(ev)
                    st = sets.get(name)
                    if count_ns:
                        try:
                            self._count_namespace_cg(name, int(ev["cgroup_id"]))
                        except Exception as e:
                            self.errors.count(label, "attribution", e)
                    self._deliver(ev, label, st, st is not None and id(ev) in sample_ids)
            except BaseException as e:
                # on_record and _deliver contain Exception: a KeyboardInterrupt or SystemExit
                # out of a sink. These records have left the ring: hand the rest over, then
                # raise (as FastRing's per-record drain does)
                raised = raised or e
        if raised is not None:
            raise raised

    def _settle_identity(self, cg: int) -> None:
        """Hand a cgroup's workload fields to the compiled formatter once they are settled."""
        assert self._jsonl is not None and self.opts.attributor is not None
        jf = self._jsonl[0]
        if not jf.knows(cg):
            ident = self.opts.attributor.settled_identity(cg)
            if ident is not None:
                jf.add_ident(cg, ident)

    def _flush_jsonl(self) -> None:
        """After each poll: the compiled output's buffer to its fd (a failure is the CLI's
        to see: JsonFormatter.broken)."""
        if self._jsonl is not None:
            try:
                self._jsonl[0].flush()
            except OSError as e:
                self.errors.count(ANY_SET, "sink", e)

    def _count_namespace(self, name: str, raw: bytes) -> None:
        cg = int.from_bytes(raw[TfHdr.cgroup_id.offset : TfHdr.cgroup_id.offset + 8], "little")
        self._count_namespace_cg(name, cg)

    def _count_namespace_cg(self, name: str, cg: int) -> None:
        ns = self.opts.attributor.namespace_of(cg)
        if ns and ns not in self._namespaces:
            if len(self._namespaces) >= self.opts.namespace_budget:
                ns = "_other"
            else:
                self._namespaces.add(ns)
        self._acct.namespace_events[(name, ns)] += 1

    # ---- polling -----------------------------------------------------------------------
    def poll_once(self, timeout_ms: int | None = None) -> int:
        self.heartbeat_ns = time.monotonic_ns()
        timeout = self.opts.poll_ms if timeout_ms is None else timeout_ms
        with self._rb_lock:
            if self.rb is not None:
                self.sync()
                try:
                    return self.rb.poll(timeout)
                finally:
                    self._flush_jsonl()
        self._stop.wait(timeout / 1000)  # no set loaded yet: nothing to poll
        return 0

    def drain(self) -> int:
        with self._rb_lock:
            if self.rb is None:
                return 0
            self.sync()
            try:
                return self.rb.consume()
            finally:
                self._flush_jsonl()

    def sync(self) -> None:
        """Tell the compiled consumer which records Python needs (sinks, samples, fallback);
        safe during its poll (atomic per-set flags in C)."""
        rb = self.rb
        if isinstance(rb, fastring.FastRing):
            # read and pushed under one lock: the consumer thread's push, computed before an
            # add_sink and delayed, landed after it and one poll's records went uncopied
            with self._sync_lock:
                deliver = bool(self._sinks)
                # the jsonl output is the only reader: its lines are made in C
                jsonl = (self._jsonl is not None and self._sinks == [self._jsonl[1]]
                         and not self.opts.namespace_budget)  # fmt: skip
                if jsonl and self._jsonl is not None:
                    self._jsonl[0].set_offset(WALL_CLOCK.offset_at(time.monotonic_ns()))
                rb.configure((int(st.spec.set_id), deliver, st.sample_rate, st.user_fallback,
                              jsonl) for st in self._sets.values())  # fmt: skip

    def start(self) -> None:
        if self._thread:
            return
        self._thread = threading.Thread(target=self._run_logged, name="tf-consumer",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _run_logged(self) -> None:
        try:
            self._run()
        except BaseException as e:  # whatever ends it, /healthz says why
            self.consumer_error = f"{type(e).__name__}: {e}"
            log.critical("ring buffer consumer thread died: %s", self.consumer_error)
            raise

    def _run(self) -> None:
        last_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:
                self.errors.count(ANY_SET, "poll", e)
                self._stop.wait(0.1)  # a persistent failure must not spin
            if time.monotonic() - last_tick > 1.0:
                last_tick = time.monotonic()
                # not while apply() holds the lock (a load runs the verifier for seconds,
                # minutes in an emulated guest): the consumer must not stall behind it
                if not self._lock.acquire(blocking=False):
                    continue
                try:
                    self._housekeeping()
                finally:
                    self._lock.release()

    def health(self) -> tuple[bool, str]:
        """(alive, why) for /healthz: the consumer runs and its heartbeat is fresh. Without a
        consumer thread (``capture`` polls from its main loop) the heartbeat alone counts."""
        thread = self._thread
        if thread is not None and not thread.is_alive():
            why = self.consumer_error or "stopped"
            return False, f"ring buffer consumer thread has exited ({why})"
        if not self.heartbeat_ns:
            return False, "ring buffer consumer not started yet"
        age = (time.monotonic_ns() - self.heartbeat_ns) / 1e9
        if age > self.opts.stale_seconds:
            return False, (f"ring buffer consumer stalled: no poll or record for {age:.1f} s "
                           f"(limit {self.opts.stale_seconds:.0f} s)")  # fmt: skip
        return True, f"ring buffer consumer alive (last poll or record {age:.1f} s ago)"

    # ---- shutdown ----------------------------------------------------------------------
    def stop(self) -> bool:
        """Stop the consumer thread; False if it is still running after 30 s (then nothing
        may consume or unmap its rings beside it)."""
        self._stop.set()
        if self.rb is not None:
            self.rb.abort()  # a drain in progress stops after its current record
        if self._thread:
            self._thread.join(timeout=30)
            return not self._thread.is_alive()
        return True

    def final_drain(self) -> int:
        """After stop(): consume what is still in the rings (the abort is lifted)."""
        with self._rb_lock:
            if self.rb is None:
                return 0
            self.rb.aborted = False
            try:
                return self.rb.consume()
            except Exception as e:
                self.errors.count(ANY_SET, "poll", e)
                return 0
            finally:
                self._flush_jsonl()

    def close(self) -> None:
        """Unmap the rings; only after stop() returned True."""
        self._flush_jsonl()
        if self.rb is not None:
            self.rb.close()
        if self._jsonl is not None:
            self._jsonl[0].close()
