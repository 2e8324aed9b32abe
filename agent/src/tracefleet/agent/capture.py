"""BpfEngine: the real capture engine. Loads event sets through the ladder, flips their enable
bits, consumes the ring buffer, applies the user-space fallback, and keeps aggregates.

Life of an event set: loaded (verified) on first use -> attached when enabled -> bit cleared
at once when disabled -> detached after ``hold_seconds`` if it stays disabled (an attached
syscall tracepoint costs every syscall on the host even with its bit off) -> re-attached,
without a reload, when enabled again.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import random
import resource
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracefleet.agent._internal import libbpf
from tracefleet.agent._internal.abi import (
    TF_COMM_LEN,
    TF_FILTER_CGROUPS,
    TF_FILTER_COMMS,
    TF_FILTER_PIDS,
    TF_PREFIX_MAX,
    TF_SET_MAX,
    TF_STAT_MAX,
    Kind,
    Stat,
    Status,
    Strategy,
    TfBlob,
    TfControl,
    TfEvent,
    TfExecEvent,
    TfHdr,
    TfStr,
)
from tracefleet.agent._internal.decode import SYSCALL_NAMES, decode_record
from tracefleet.agent._internal.fallback import UserFallback
from tracefleet.agent._internal.metrics import add_events
from tracefleet.agent.engine import (
    Aggregates,
    EventSetConfig,
    Filters,
    SetAggregate,
    SetStatus,
)
from tracefleet.agent.eventsets import BY_ID, EVENT_SETS, EventSetSpec, arg_spec
from tracefleet.agent.hostcheck import HostInfo, btf_has_name, check_host
from tracefleet.agent.ladder import (
    LADDER,
    Attempt,
    LadderExhausted,
    LoadedSet,
    SharedMaps,
    load_set,
)

log = logging.getLogger("tracefleet.agent")

_HDR_SIZE = ctypes.sizeof(TfHdr)
_HDR = struct.Struct("=Q24x8xHHB")  # ts_ns, (exit_ns, cgroup_id, ret, pid, tid), kind, syscall, set
_ST_LOST = int(Status.LOST)
# offsets of every argument's status byte, per record kind
_LOST_OFFSETS = {
    int(Kind.SYSCALL): [
        TfEvent.str.offset + i * ctypes.sizeof(TfStr) + TfStr.status.offset for i in range(2)
    ]
    + [TfEvent.blob.offset + TfBlob.status.offset],
    int(Kind.EXEC): [
        TfExecEvent.filename.offset + TfStr.status.offset,
        TfExecEvent.argv_status.offset,
    ],
}


def raise_fd_limit(want: int = 65536) -> int:
    """Every program, link and perf event is an fd (about 5 per syscall of a set): lift the
    soft RLIMIT_NOFILE to the hard one, and the hard one too where we may (CAP_SYS_RESOURCE).
    Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else max(hard, min(want, hard))
    for new in ((max(soft, want), max(hard, want)), (max(soft, target), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, new)
            return new[0]
        except (ValueError, OSError):
            continue
    return soft


def _peek_header(raw: bytes) -> tuple[int, int, int]:
    ts_ns, _kind, syscall, set_id = _HDR.unpack_from(raw)
    return set_id, syscall, ts_ns


def _has_lost_arg(raw: bytes) -> bool:
    kind = int.from_bytes(raw[TfHdr.kind.offset : TfHdr.kind.offset + 2], "little")
    return any(off < len(raw) and raw[off] == _ST_LOST for off in _LOST_OFFSETS.get(kind, ()))


EventSink = Callable[[dict[str, Any]], None]


def _prefix_ok(ev: dict[str, Any], f: Filters) -> bool:
    """The path-prefix filter for paths the kernel could not match: a vfs hook that only had
    a dentry sends the path relative to its file system, and the mount point is known here."""
    path = ev["args"].get("path", {})
    if path.get("kind") != "mount-relative" or path.get("value") is None:
        return True
    return any(str(path["value"]).startswith(p) for p in f.path_prefixes)


class FilterError(ValueError):
    pass


@dataclass
class _SetState:
    spec: EventSetSpec
    loaded: LoadedSet | None = None
    enabled: bool = False
    filters: Filters = field(default_factory=Filters)
    sample_rate: float = 0.0
    disabled_at: float = 0.0
    user_fallback: bool = False
    error: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    forced: Strategy | None = None


@dataclass
class EngineOptions:
    bpf_dir: Path | None = None
    ring_bytes: int = 8 << 20  # per event set: each loaded set has its own ring
    wakeup_bytes: int = 1 << 20  # batch: wake the consumer at 1 MiB queued, else poll timer
    poll_ms: int = 20
    hold_seconds: float = 30.0
    inflight_entries: int = 4096
    user_fallback: bool = True
    strategies: Mapping[str, Strategy] = field(default_factory=dict)  # forced, per set
    sample_buffer: int = 10000
    sets: tuple[str, ...] = ()  # event sets this engine offers (default: all)
    # tracefs not mounted: mount it in a mount namespace of this process rather than fail
    # (hostcheck.mount_tracefs_privately; the CLI turns it on, in-process users do not)
    mount_tracefs: bool = False


def _bounded(items: Sequence[Any], limit: int, what: str) -> Sequence[Any]:
    if len(items) > limit:
        raise FilterError(f"at most {limit} {what} per event set (got {len(items)})")
    return items


def build_filter(ctl: TfControl, slot: int, f: Filters) -> None:
    """Write ``f`` into control slot ``slot``; FilterError if the kernel cannot express it."""
    k = ctl.filter[slot]
    pids = _bounded(f.pids, TF_FILTER_PIDS, "pids")
    comms = _bounded(f.comms, TF_FILTER_COMMS, "comm filters")
    cgroups = _bounded(f.cgroup_ids, TF_FILTER_CGROUPS, "cgroup filters")
    prefixes = _bounded(f.path_prefixes, 1, "path prefixes")
    k.npids = len(pids)
    for i, p in enumerate(pids):
        k.pids[i] = p
    k.ncomms = len(comms)
    for i, c in enumerate(comms):
        raw = c.encode()
        if len(raw) >= TF_COMM_LEN:
            raise FilterError(f"comm {c!r} is longer than {TF_COMM_LEN - 1} bytes")
        k.comms[i].value = raw
    k.ncgroups = len(cgroups)
    for i, g in enumerate(cgroups):
        k.cgroups[i] = g
    if prefixes:
        raw = prefixes[0].encode()
        if not raw or len(raw) > TF_PREFIX_MAX:
            raise FilterError(f"path prefix must be 1..{TF_PREFIX_MAX} bytes")
        k.prefix = raw
        k.prefix_len = len(raw)


class BpfEngine:
    """Capture on this host's kernel. Thread-safe: apply() from the control thread, events
    from the consumer thread started by start()."""

    def __init__(self, options: EngineOptions | None = None, host: HostInfo | None = None):
        self.opts = options or EngineOptions()
        self.host = host or check_host(mount_tracefs=self.opts.mount_tracefs)
        self.bpf_dir = Path(self.opts.bpf_dir or self.host.bpf_dir)
        self.fd_limit = raise_fd_limit()
        self._lock = threading.RLock()
        self._fds: list[int] = []
        self.shared = SharedMaps(
            control=self._create(libbpf.BPF_MAP_TYPE_ARRAY, "tf_control", 4,
                                 ctypes.sizeof(TfControl), 1),
            events=-1,  # one ring per set, created when the set loads (_ring_for)
            stats=self._create(libbpf.BPF_MAP_TYPE_PERCPU_ARRAY, "tf_stats", 4, 8,
                               TF_SET_MAX * TF_STAT_MAX),
        )  # fmt: skip
        self._ncpu = libbpf.num_possible_cpus()
        self._sets = {
            name: _SetState(spec)
            for name, spec in EVENT_SETS.items()
            if not self.opts.sets or name in self.opts.sets
        }
        for name, strat in self.opts.strategies.items():
            self._sets[name].forced = strat
        self._fallback = UserFallback()
        self._sinks: list[EventSink] = []
        self._samples: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=self.opts.sample_buffer
        )
        self._agg = self._new_aggregates()
        self._last_kernel = self._read_stats()
        self._user_recovered: collections.Counter[str] = collections.Counter()
        # cumulative totals for the metrics endpoint (collect() hands out deltas):
        # intervals settled, the last interval collect() returned, user recoveries so far
        self._cum: dict[str, SetAggregate] = {}
        self._pending = self._new_aggregates()
        self._cum_user: collections.Counter[str] = collections.Counter()
        self._stats_fd: int | None = None
        self._decode_errors = 0
        self.reaped: collections.Counter[str] = collections.Counter()  # reap_inflight()
        self.cleared: collections.Counter[str] = collections.Counter()  # detach clear-out
        self._last_agent_lost: dict[str, int] = {}  # reaped + cleared at the last collect()
        # Per-set rings (a flood in one set cannot fill another's), all consumed by one
        # libbpf ring_buffer in one poll; memory: loaded sets x ring_bytes. _rb_lock
        # serialises ring_buffer__add with poll/consume.
        self._rings: dict[str, int] = {}
        self._rb: libbpf.RingBuffer | None = None
        self._rb_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_control()

    # ---- setup -------------------------------------------------------------------------
    def _create(self, mtype: int, name: str, ksz: int, vsz: int, n: int) -> int:
        fd = libbpf.map_create(mtype, name, ksz, vsz, n)
        self._fds.append(fd)
        return fd

    def _ring_for(self, name: str) -> int:
        """The set's own ring, created (and added to the consumer) on first use."""
        if name not in self._rings:
            fd = self._create(libbpf.BPF_MAP_TYPE_RINGBUF, f"tf_ev_{name}"[:15], 0, 0,
                              self.opts.ring_bytes)  # fmt: skip
            with self._rb_lock:
                if self._rb is None:
                    self._rb = libbpf.RingBuffer(fd, self._on_record)
                else:
                    self._rb.add(fd)
            self._rings[name] = fd
        return self._rings[name]

    def _strategies_for(self, st: _SetState) -> tuple[Strategy, ...]:
        return (st.forced,) if st.forced else (st.spec.ladder or LADDER)

    def ensure_loaded(self, name: str) -> _SetState:
        """Load a set through the ladder (once). Failure is recorded in the state."""
        with self._lock:
            st = self._sets[name]
            if st.loaded or st.error:
                return st
            try:
                st.loaded = load_set(
                    st.spec,
                    self.bpf_dir,
                    dataclasses.replace(self.shared, events=self._ring_for(name)),
                    strategies=self._strategies_for(st),
                    agent_tgid=os.getpid(),
                    wakeup_bytes=self.opts.wakeup_bytes,
                    inflight_entries=self.opts.inflight_entries,
                )
                st.attempts = st.loaded.attempts
                kernel = st.loaded.strategy
                if st.forced:
                    st.user_fallback = st.forced == Strategy.USER_FALLBACK
                else:
                    st.user_fallback = self.opts.user_fallback and kernel in (
                        Strategy.EXIT_RETRY,
                        Strategy.NOFAULT,
                    )
                st.user_fallback = st.user_fallback and self._fallback.available
                log.info("event set %s: strategy %s%s", name, kernel.label,
                         " + user-fallback" if st.user_fallback else "")  # fmt: skip
            except LadderExhausted as e:
                st.attempts = e.attempts
                st.error = str(e)
                log.error("%s", e)
            return st

    # ---- control -----------------------------------------------------------------------
    def _write_control(self) -> None:
        ctl = TfControl()
        for st in self._sets.values():
            if st.enabled and st.loaded and st.loaded.attached:
                ctl.enabled_bits |= 1 << int(st.spec.set_id)
            build_filter(ctl, int(st.spec.set_id), st.filters)
        libbpf.map_update(self.shared.control, ctypes.c_uint32(0), ctl)

    def event_sets(self) -> Sequence[str]:
        return list(self._sets)

    def apply(self, desired: Mapping[str, EventSetConfig]) -> Sequence[SetStatus]:
        with self._lock:
            for name in desired:
                if name not in self._sets:
                    log.warning("ignoring unknown event set %r", name)
            # validate filters first so a bad one changes nothing
            errors: dict[str, str] = {}
            for name, cfg in desired.items():
                if name in self._sets:
                    try:
                        build_filter(TfControl(), 0, cfg.filters)
                    except FilterError as e:
                        errors[name] = str(e)
            now = time.monotonic()
            for name, st in self._sets.items():
                cfg = desired.get(name)
                want = bool(cfg and cfg.enabled and name not in errors)
                if cfg and name not in errors:
                    st.filters = cfg.filters
                    st.sample_rate = cfg.sample_rate
                if want:
                    self.ensure_loaded(name)
                    if st.loaded:
                        try:
                            st.loaded.attach()
                            st.enabled = True
                        except libbpf.LibbpfError as e:
                            st.error = f"attach failed: {e}"
                            st.enabled = False
                elif st.enabled:
                    st.enabled = False
                    st.disabled_at = now
            self._write_control()
            return [self._status(name, errors.get(name, "")) for name in self._sets]

    def _status(self, name: str, err: str = "") -> SetStatus:
        st = self._sets[name]
        strat = st.loaded.strategy.label if st.loaded else "none"
        if st.user_fallback:
            strat += "+user-fallback"
        return SetStatus(
            name=name,
            enabled=st.enabled,
            attached=bool(st.loaded and st.loaded.attached),
            strategy=strat,
            error=err or st.error,
        )

    def statuses(self) -> list[SetStatus]:
        with self._lock:
            return [self._status(n) for n in self._sets]

    def detach_idle(self, now: float | None = None) -> list[str]:
        """Detach sets disabled for longer than the hold time; returns their names."""
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            for name, st in self._sets.items():
                idle = st.loaded and st.loaded.attached and not st.enabled
                if idle and now - st.disabled_at >= self.opts.hold_seconds:
                    assert st.loaded
                    st.loaded.detach()
                    self._clear_inflight(st)
                    out.append(name)
        for name in out:
            log.info("event set %s detached after %.0fs disabled", name, self.opts.hold_seconds)
        return out

    def _drop_inflight(self, st: _SetState, only: Callable[[int], bool] | None = None) -> int:
        """Delete the set's per-thread entries (those whose tid passes ``only``, else all);
        returns how many were deleted."""
        assert st.loaded
        fd = st.loaded.map_fd(st.spec.inflight_map)
        n = 0
        for tid in list(libbpf.map_keys(fd, ctypes.c_uint32)):
            if (only is None or only(tid)) and libbpf.map_delete(fd, ctypes.c_uint32(tid)):
                n += 1
        return n

    def _clear_inflight(self, st: _SetState) -> None:
        """Per-thread state of a detached set can never complete: drop it (counted: those
        calls passed the filters and are neither delivered nor dropped)."""
        self.cleared[st.spec.name] += self._drop_inflight(st)

    def reap_inflight(self) -> dict[str, int]:
        """Drop the per-thread entries of threads that no longer exist; returns how many per
        set (also added to ``self.reaped``). The kernel deletes an entry at the syscall's exit;
        a thread that dies without one (on the 7.2 guest, a thread killed by a sibling's exec
        while blocked in a syscall left one) would otherwise hold its slot for good
        (the in-flight maps are plain hashes: an LRU would evict live calls silently). Tids
        are the kernel's (init PID namespace): the agent runs with hostPID, as its own-pid
        filter already requires."""
        out: dict[str, int] = {}
        with self._lock:
            for name, st in self._sets.items():
                if not st.loaded:
                    continue
                n = self._drop_inflight(st, lambda tid: not os.path.exists(f"/proc/{tid}"))
                if n:
                    out[name] = n
        for name, n in out.items():
            self.reaped[name] += n
            log.debug("event set %s: dropped %d in-flight entries of dead threads", name, n)
        return out

    def inflight_count(self, name: str) -> int:
        st = self._sets[name]
        if not st.loaded:
            return 0
        return sum(1 for _ in libbpf.map_keys(st.loaded.map_fd(st.spec.inflight_map),
                                              ctypes.c_uint32))  # fmt: skip

    # ---- events ------------------------------------------------------------------------
    def add_sink(self, sink: EventSink) -> None:
        self._sinks = [*self._sinks, sink]  # copy on write: the consumer thread iterates it

    def remove_sink(self, sink: EventSink) -> None:
        self._sinks = [s for s in self._sinks if s is not sink]

    def _on_record(self, raw: bytes) -> None:
        """Per record: aggregates from the header alone (cheap); the full decode only when
        someone reads the event (a sink, a sample) or an argument is left for the fallback."""
        now = time.monotonic_ns()
        if len(raw) < _HDR_SIZE:
            self._decode_errors += 1
            return
        set_id, syscall, ts_ns = _peek_header(raw)
        spec = BY_ID.get(set_id)
        name = spec.name if spec else str(set_id)
        st = self._sets.get(name)
        agg = self._agg.sets.get(name)
        if agg is None:
            agg = self._agg.sets[name] = SetAggregate()
        agg.delivered += 1
        sc = SYSCALL_NAMES.get(syscall, str(syscall))
        agg.events_by_syscall[sc] = agg.events_by_syscall.get(sc, 0) + 1
        agg.latency.observe(max(0, now - ts_ns) / 1e9)
        fallback = st is not None and st.user_fallback and _has_lost_arg(raw)
        sample = (
            st is not None
            and st.sample_rate > 0
            and (st.sample_rate >= 1.0 or random.random() < st.sample_rate)
        )
        if not (self._sinks or sample or fallback):
            return
        try:
            ev, rec = decode_record(raw, now)
        except ValueError:
            self._decode_errors += 1
            return
        if fallback and self._apply_fallback(rec, name):
            ev, _ = decode_record(bytes(rec), now)  # re-decode with the recovered values
        if st is not None and st.filters.path_prefixes and not _prefix_ok(ev, st.filters):
            return
        if sample:
            self._samples.append(ev)
        for sink in self._sinks:
            sink(ev)

    def _apply_fallback(self, rec: ctypes.Structure, set_name: str) -> bool:
        fb = self._fallback
        n = 0
        if isinstance(rec, TfExecEvent):
            pid = rec.hdr.tid
            n += fb.fix_str(pid, rec.filename) if rec.hdr.ret != 0 else 0
            n += fb.fix_argv(pid, rec)
        elif isinstance(rec, TfEvent):
            pid = rec.hdr.tid
            for s in rec.str:
                n += fb.fix_str(pid, s)
            spec = arg_spec(rec.hdr.event_set, SYSCALL_NAMES.get(rec.hdr.syscall, ""))
            if spec.blob_len >= 0:  # a length behind a pointer (accept4) is not re-read
                n += fb.fix_blob(pid, rec.blob, int(rec.iargs[spec.blob_len]))
        if n:
            self._user_recovered[set_name] += n
        return bool(n)

    def poll_once(self, timeout_ms: int | None = None) -> int:
        timeout = self.opts.poll_ms if timeout_ms is None else timeout_ms
        with self._rb_lock:
            if self._rb is not None:
                return self._rb.poll(timeout)
        self._stop.wait(timeout / 1000)  # no set loaded yet: nothing to poll
        return 0

    def drain(self) -> int:
        with self._rb_lock:
            return self._rb.consume() if self._rb is not None else 0

    def start(self) -> None:
        if self._thread:
            return
        self._thread = threading.Thread(target=self._run, name="tf-consumer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                log.exception("ring buffer consumer")
            if time.monotonic() - last_tick > 1.0:
                last_tick = time.monotonic()
                self.detach_idle()
                self.reap_inflight()

    # ---- counters ----------------------------------------------------------------------
    def _read_stats(self) -> list[int]:
        """Sum over CPUs of every kernel counter, indexed set * TF_STAT_MAX + stat."""
        vals = (ctypes.c_uint64 * self._ncpu)()
        out = []
        for key in range(TF_SET_MAX * TF_STAT_MAX):
            libbpf.map_lookup(self.shared.stats, ctypes.c_uint32(key), vals)
            out.append(sum(vals))
        return out

    def kernel_counters(self, name: str) -> dict[str, int]:
        sid = int(EVENT_SETS[name].set_id)
        stats = self._read_stats()
        return {s.name.lower(): stats[sid * TF_STAT_MAX + int(s)] for s in Stat}

    def accounting(self, name: str) -> dict[str, int]:
        """Where every call that passed the set's filters went (syscall sets: file, exec,
        net). ``passed = written + dropped + lost + prefix_filtered + in_flight``, with
        ``lost`` the counted losses (in-flight map full, a dead thread's slot retaken, entries
        of dead threads or of a detached set deleted by the agent); ``unaccounted`` is what
        breaks the identity, 0 unless calls vanish silently. ``written`` is the kernel's count
        of records put in the ring (the consumer delivers each once it reads it)."""
        k = self.kernel_counters(name)
        in_flight = self.inflight_count(name)
        lost = k["inflight_full"] + k["inflight_stale"] + self.reaped[name] + self.cleared[name]
        out = {
            "passed": k["passed"],
            "written": k["events"],
            "dropped": k["dropped"],
            "lost": lost,
            "prefix_filtered": k["prefix_filtered"],
            "in_flight": in_flight,
        }
        out["unaccounted"] = out["passed"] - (
            out["written"] + out["dropped"] + lost + out["prefix_filtered"] + in_flight
        )
        return out

    def _new_aggregates(self) -> Aggregates:
        now = time.time_ns()
        return Aggregates(interval_start_ns=now, interval_end_ns=now)

    def collect(self) -> Aggregates:
        with self._lock:
            agg, self._agg = self._agg, self._new_aggregates()
            kernel = self._read_stats()
            prev, self._last_kernel = self._last_kernel, kernel
            user, self._user_recovered = self._user_recovered, collections.Counter()
            agent_lost = {n: self.reaped[n] + self.cleared[n] for n in self._sets}
            prev_lost, self._last_agent_lost = self._last_agent_lost, agent_lost
            # the consumer thread may still add to the interval just swapped out: it moves
            # into the settled totals one collect() later
            for name, sa in list(self._pending.sets.items()):
                add_events(self._cum.setdefault(name, SetAggregate()), sa)
            self._pending = agg
            self._cum_user.update(user)
        agg.interval_end_ns = time.time_ns()
        for name, st in self._sets.items():
            sid = int(st.spec.set_id)

            def delta(stat: Stat, sid: int = sid) -> int:
                i = sid * TF_STAT_MAX + int(stat)
                return kernel[i] - prev[i]

            d = {s: delta(s) for s in Stat}
            if not any(d.values()) and name not in agg.sets:
                continue
            sa = agg.sets.setdefault(name, SetAggregate())
            sa.dropped = d[Stat.DROPPED]
            sa.passed = d[Stat.PASSED]
            deleted = agent_lost[name] - prev_lost.get(name, 0)
            sa.lost = d[Stat.INFLIGHT_FULL] + d[Stat.INFLIGHT_STALE] + deleted
            strat = st.loaded.strategy.label if st.loaded else "none"
            recovered_user = user.get(name, 0)
            for stat, outcome in (
                (Stat.ARG_OK, "ok"),
                (Stat.ARG_RECOVERED, "recovered"),
                (Stat.ARG_LOST, "lost"),
                (Stat.ARG_TRUNCATED, "truncated"),
                (Stat.ARG_TORN, "torn"),
                (Stat.ARG_MISMATCH, "mismatch"),
                (Stat.ARG_REREAD, "reread"),
            ):
                n = d[stat] - (recovered_user if stat == Stat.ARG_LOST else 0)
                if n:
                    sa.outcomes[(strat, outcome)] = n
            if recovered_user:
                sa.outcomes[("user-fallback", "recovered")] = recovered_user
        return agg

    def totals(self) -> dict[str, SetAggregate]:
        """Cumulative aggregates since the engine started (collect() returns deltas and is
        consumed by the controller client; the metrics endpoint reads this). Drops and
        argument outcomes are the kernel's counters, read now."""
        with self._lock:
            kernel = self._read_stats()
            out: dict[str, SetAggregate] = {}
            for src in (self._cum, self._pending.sets, self._agg.sets):
                for name, sa in list(src.items()):
                    add_events(out.setdefault(name, SetAggregate()), sa)
            user = self._cum_user + self._user_recovered
        for name, st in self._sets.items():
            sid = int(st.spec.set_id)
            k = {s: kernel[sid * TF_STAT_MAX + int(s)] for s in Stat}
            if not st.loaded and not any(k.values()) and name not in out:
                continue
            sa = out.setdefault(name, SetAggregate())
            sa.dropped = k[Stat.DROPPED]
            sa.passed = k[Stat.PASSED]
            sa.lost = (k[Stat.INFLIGHT_FULL] + k[Stat.INFLIGHT_STALE] + self.reaped[name]
                       + self.cleared[name])  # fmt: skip
            strat = st.loaded.strategy.label if st.loaded else "none"
            recovered_user = user.get(name, 0)
            sa.outcomes = {
                (strat, "ok"): k[Stat.ARG_OK],
                (strat, "recovered"): k[Stat.ARG_RECOVERED],
                (strat, "lost"): max(0, k[Stat.ARG_LOST] - recovered_user),
                (strat, "truncated"): k[Stat.ARG_TRUNCATED],
            }
            for stat, outcome in (
                (Stat.ARG_TORN, "torn"),
                (Stat.ARG_MISMATCH, "mismatch"),
                (Stat.ARG_REREAD, "reread"),
            ):
                if k[stat]:
                    sa.outcomes[(strat, outcome)] = k[stat]
            if recovered_user or st.user_fallback:
                sa.outcomes[("user-fallback", "recovered")] = recovered_user
        return out

    def enable_run_stats(self) -> bool:
        """Turn on the kernel's BPF run-time statistics (run_time_ns, run_cnt per program)
        until close(). System-wide: every BPF program on the host then pays two clock reads
        per run. False (logged) if the kernel refuses."""
        with self._lock:
            if self._stats_fd is None:
                try:
                    self._stats_fd = libbpf.enable_stats()
                except libbpf.LibbpfError as e:
                    log.warning("cannot enable BPF run-time stats: %s", e)
                    return False
            return True

    @property
    def bpf_stats_enabled(self) -> bool:
        return self._stats_fd is not None

    def program_stats(self) -> list[tuple[str, str, int, int]]:
        """(event set, program, run time ns, run count) of every loaded program; the
        kernel counts only while BPF stats are on (enable_run_stats())."""
        out = []
        with self._lock:
            for name, st in self._sets.items():
                if st.loaded:
                    for prog, fd in sorted(st.loaded.program_fds().items()):
                        _, run_ns, runs = libbpf.prog_stats(fd)
                        out.append((name, prog, run_ns, runs))
        return out

    def sample_events(self, limit: int) -> list[dict[str, Any]]:
        out = []
        while self._samples and len(out) < limit:
            out.append(self._samples.popleft())
        return out

    # ---- report ------------------------------------------------------------------------
    def capabilities(self) -> Mapping[str, Any]:
        """Probe report. Loads every set through the ladder (without enabling it)."""
        for name in self._sets:
            self.ensure_loaded(name)
        sets: dict[str, Any] = {}
        for name, st in self._sets.items():
            chosen = st.loaded.strategy.label if st.loaded else None
            better = [a for a in st.attempts if not a.ok]
            sets[name] = {
                "strategy": chosen,
                "forced": st.forced.label if st.forced else None,
                "user_fallback": st.user_fallback,
                "attempts": [a.__dict__ for a in st.attempts],
                "reason": (
                    "best strategy available"
                    if chosen and not better
                    else "; ".join(f"{a.strategy} unavailable: {a.reason}" for a in better)
                ),
                "error": st.error or None,
                "syscalls": list(st.spec.syscalls),
            }
        return {
            "kernel": self.host.kernel,
            "arch": self.host.arch,
            "libbpf": libbpf.version(),
            "features": {
                "btf": self.host.btf,
                "tracefs": self.host.tracefs,
                "tracefs_mounted_by_agent": self.host.tracefs_mounted_by_agent,
                "lockdown": self.host.lockdown,
                "kfunc_bpf_copy_from_user_str": btf_has_name("bpf_copy_from_user_str"),
                "sleepable_tracepoints": self._sleepable_seen(),
                "user_fallback": self._fallback.reason,
                "capabilities": list(self.host.capabilities),
            },
            "bpf_dir": str(self.bpf_dir),
            "event_sets": sets,
        }

    def _sleepable_seen(self) -> bool:
        return any(
            a.strategy == "sleepable" and a.ok for st in self._sets.values() for a in st.attempts
        )

    def close(self) -> None:
        self._stop.set()
        if self._rb is not None:
            self._rb.abort()  # a drain in progress stops at its next record
        alive = False
        if self._thread:
            self._thread.join(timeout=30)
            alive = self._thread.is_alive()
            if alive:
                log.error("ring buffer consumer did not stop in 30 s; leaving its ring mapped")
        with self._lock:
            for st in self._sets.values():
                if st.loaded:
                    st.loaded.close()
                    st.loaded = None
            if not alive and self._rb is not None:  # never unmap a ring under a consumer
                self._rb.close()
            if self._stats_fd is not None:
                os.close(self._stats_fd)
                self._stats_fd = None
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> BpfEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
