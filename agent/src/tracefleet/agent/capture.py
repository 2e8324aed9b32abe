"""BpfEngine: the real capture engine. Loads event sets through the ladder, flips their enable
bits, consumes the ring buffer, applies the user-space fallback, and keeps aggregates.

Life of an event set: loaded (verified) when first enabled, at the best rung the feature
probes allow (``ladder.probe_features``, run once) -> attached when enabled -> bit cleared
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

from tracefleet.agent._internal import fastring, libbpf
from tracefleet.agent._internal.abi import (
    TF_SET_MAX,
    TF_STAT_MAX,
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
from tracefleet.agent._internal.contain import ANY_SET, UNKNOWN_SET, ErrorCounter
from tracefleet.agent._internal.decode import (
    LOST_HEADS,
    SYSCALL_NAMES,
    decode_record,
    decode_struct,
    has_lost_arg,
)
from tracefleet.agent._internal.fallback import CallerGone, UserFallback
from tracefleet.agent._internal.kfilter import to_kernel
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
    RUNG_NEEDS,
    Attempt,
    LadderExhausted,
    LoadedSet,
    ProbeResult,
    SharedMaps,
    load_set,
    plan,
    probe_features,
)
from tracefleet.model.filters import FilterError

log = logging.getLogger("tracefleet.agent")

_HDR_SIZE = ctypes.sizeof(TfHdr)
_HDR = struct.Struct("=Q24x8xHHB")  # ts_ns, (exit_ns, cgroup_id, ret, pid, tid), kind, syscall, set


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


EventSink = Callable[[dict[str, Any]], None]


def _prefix_ok(ev: dict[str, Any], f: Filters) -> bool:
    """The path-prefix filter for paths the kernel could not match: a vfs hook that only had
    a dentry sends the path relative to its file system, and the mount point is known here."""
    path = ev["args"].get("path", {})
    if path.get("kind") != "mount-relative" or path.get("value") is None:
        return True
    return any(str(path["value"]).startswith(p) for p in f.path_prefixes)


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
    # /healthz fails when the consumer's heartbeat (each poll, each record) is older than this
    stale_seconds: float = 30.0
    # the compiled ring consumer (fastring): opt-in (TRACEFLEET_FASTRING=on) for now: with it
    # on, the 7.2 guest failed the process-tree follow test (not explained yet; README)
    compiled_consumer: bool = field(default_factory=lambda: fastring.requested())
    # workload identity (workload.Attributor): events get container/pod fields, and
    # workload selectors resolve to cgroup ids; None: neither
    attributor: Any = None
    filter_entries: int = 65536  # cgroup ids / followed processes the kernel maps hold
    # events per namespace for /metrics: off (0), else at most this many namespace label
    # values; events of namespaces beyond it count under "_other" (bounded cardinality)
    namespace_budget: int = 0


def build_filter(ctl: TfControl, slot: int, f: Filters) -> None:
    """Write ``f`` into control slot ``slot``; FilterError if the kernel cannot express it."""
    ctl.filter[slot] = to_kernel(f)


def _check_workload(f: Filters, attributor: Any) -> None:
    if not f.workload:
        return
    if attributor is None or attributor.pods is None:
        raise FilterError(
            "--namespace/--pod/--container/--selector need pod metadata: run "
            "in the cluster (in-cluster credentials) or pass --kube-api URL"
        )


def _descendants(seed: Mapping[int, int]) -> dict[int, int]:
    """``seed`` (tgid -> set bits) plus every live descendant of those tgids, inheriting
    the bits, from /proc (stat field 4 is the parent's tgid)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: fields follow the last ')'
        parent[int(d)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    out = dict(seed)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in out and (out.get(pid, 0) | out[ppid]) != out.get(pid, 0):
                out[pid] = out.get(pid, 0) | out[ppid]
                changed = True
    return out


class BpfEngine:
    """Capture on this host's kernel. Thread-safe: apply() from the control thread, events
    from the consumer thread started by start()."""

    def __init__(self, options: EngineOptions | None = None, host: HostInfo | None = None):
        self.opts = options or EngineOptions()
        self.host = host or check_host(mount_tracefs=self.opts.mount_tracefs)
        self.bpf_dir = Path(self.opts.bpf_dir or self.host.bpf_dir)
        self.fd_limit = raise_fd_limit()
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()  # one set loads at a time, outside _lock
        self._fds: list[int] = []
        self.shared = SharedMaps(
            control=self._create(libbpf.BPF_MAP_TYPE_ARRAY, "tf_control", 4,
                                 ctypes.sizeof(TfControl), 1),
            events=-1,  # one ring per set, created when the set loads (_ring_for)
            stats=self._create(libbpf.BPF_MAP_TYPE_PERCPU_ARRAY, "tf_stats", 4, 8,
                               TF_SET_MAX * TF_STAT_MAX),
            cgroups=self._create(libbpf.BPF_MAP_TYPE_HASH, "tf_cgroups", 8, 8,
                                 self.opts.filter_entries),
            follow=self._create(libbpf.BPF_MAP_TYPE_HASH, "tf_follow", 4, 8,
                                self.opts.filter_entries),
        )  # fmt: skip
        self._cg_lock = threading.Lock()
        self._cg_written: dict[int, int] = {}  # tf_cgroups as last written
        self._follow_obj: libbpf.BpfObject | None = None
        self._follow_links: list[libbpf.Link] = []
        self._follow_seeded: dict[str, tuple[int, ...]] = {}
        self.filter_map_full = 0  # cgroup ids the kernel map refused (full), counted
        # (set, namespace) -> events, when opted in (namespace_budget); "" = not in a pod
        self.namespace_events: collections.Counter[tuple[str, str]] = collections.Counter()
        self._namespaces: set[str] = set()
        if self.opts.attributor is not None:
            self.opts.attributor.add_listener(self._sync_cgroups)
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
        # arguments the fallback moved out of lost, per set; key "<set>/truncated": how many
        # of those came out truncated rather than recovered
        self._user_recovered: collections.Counter[str] = collections.Counter()
        # cumulative totals for the metrics endpoint (collect() hands out deltas):
        # intervals settled, the last interval collect() returned, user recoveries so far
        self._cum: dict[str, SetAggregate] = {}
        self._pending = self._new_aggregates()
        self._cum_user: collections.Counter[str] = collections.Counter()
        self._stats_fd: int | None = None
        self.errors = ErrorCounter()  # contained per-record failures, per (set, cause)
        # fallback reads refused because the tid no longer is the caller, per (set, cause)
        self.fallback_rejected: collections.Counter[tuple[str, str]] = collections.Counter()
        self.heartbeat_ns = 0  # monotonic time of the consumer's last poll or record
        self.consumer_error = ""  # why the consumer thread ended, if it did
        self._probes: dict[str, ProbeResult] | None = None
        self.reaped: collections.Counter[str] = collections.Counter()  # reap_inflight()
        self.cleared: collections.Counter[str] = collections.Counter()  # detach clear-out
        self._last_agent_lost: dict[str, int] = {}  # reaped + cleared at the last collect()
        self._last_missed: dict[str, tuple[int, int]] = {}  # kernel_missed() at the last one
        # Per-set rings (a flood in one set cannot fill another's), all consumed by one
        # libbpf ring_buffer in one poll; memory: loaded sets x ring_bytes. _rb_lock
        # serialises ring_buffer__add with poll/consume.
        self._rings: dict[str, int] = {}
        self._rb: libbpf.RingBuffer | fastring.FastRing | None = None
        self._rb_lock = threading.Lock()
        self._sync_lock = threading.Lock()  # _sync_consumer: state read + push, as one
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
                    self._rb = self._new_consumer(fd)
                else:
                    self._rb.add(fd)
            self._rings[name] = fd
        return self._rings[name]

    def consumer(self) -> tuple[bool, str]:
        """(compiled consumer in use, why): fastring where it loads, else the Python one."""
        if not self.opts.compiled_consumer:
            return False, (
                f"Python consumer (the compiled one is opt-in for now: {fastring.ENV}=on)"
            )
        return fastring.consumer_status()

    def _new_consumer(self, fd: int) -> libbpf.RingBuffer | fastring.FastRing:
        if self.consumer()[0]:
            try:
                return fastring.FastRing(fd, self._on_record, lambda: self._agg, LOST_HEADS,
                                         self.errors)  # fmt: skip
            except Exception as e:  # said once; the Python consumer does the same work
                log.warning("compiled ring consumer failed to start, using Python: %s", e)
                self.opts.compiled_consumer = False
        return libbpf.RingBuffer(fd, self._on_record)

    def _strategies_for(self, st: _SetState) -> tuple[Strategy, ...]:
        return (st.forced,) if st.forced else (st.spec.ladder or LADDER)

    def probes(self) -> dict[str, ProbeResult]:
        """What this kernel allows, from the feature probes (run once, milliseconds each)."""
        if self._probes is not None:  # never wait behind a set being loaded
            return self._probes
        with self._lock:
            if self._probes is None:
                self._probes = probe_features(self.bpf_dir)
            return self._probes

    def _with_fallback(self, st: _SetState, kernel: Strategy) -> bool:
        if st.forced:
            want = st.forced == Strategy.USER_FALLBACK
        else:
            want = self.opts.user_fallback and kernel in (Strategy.EXIT_RETRY, Strategy.NOFAULT)
        return want and self._fallback.available

    def ensure_loaded(self, name: str, *, attach: bool = False) -> _SetState:
        """Load a set through the ladder (once), from the best rung the probes allow (a
        forced rung is tried as asked). With ``attach`` its programs stay attached (the set
        is being enabled). Failure is recorded in the state. The verifier takes seconds (tens
        in an emulated guest): it runs outside the engine's lock, so collect(), statuses()
        and the consumer, hence the agent's heartbeat to its controller, go on meanwhile."""
        with self._load_lock:
            st = self._sets[name]
            if st.loaded or st.error:
                return st
            probes = None if st.forced else self.probes()
            try:
                loaded = load_set(
                    st.spec,
                    self.bpf_dir,
                    dataclasses.replace(self.shared, events=self._ring_for(name)),
                    strategies=self._strategies_for(st),
                    agent_tgid=os.getpid(),
                    wakeup_bytes=self.opts.wakeup_bytes,
                    inflight_entries=self.opts.inflight_entries,
                    probes=probes,
                    keep_attached=attach,
                )
            except LadderExhausted as e:
                with self._lock:
                    st.attempts = e.attempts
                    st.error = str(e)
                log.error("%s", e)
                return st
            with self._lock:
                st.loaded = loaded
                st.attempts = loaded.attempts
                st.user_fallback = self._with_fallback(st, loaded.strategy)
                st.disabled_at = time.monotonic()  # not idle: apply() enables it next
            log.info("event set %s: strategy %s%s", name, loaded.strategy.label,
                     " + user-fallback" if st.user_fallback else "")  # fmt: skip
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
        for name in desired:
            if name not in self._sets:
                log.warning("ignoring unknown event set %r", name)
        # validate filters first so a bad one changes nothing
        errors: dict[str, str] = {}
        cfg: EventSetConfig | None  # the loops below share the name
        for name, cfg in desired.items():
            if name in self._sets:
                try:
                    build_filter(TfControl(), 0, cfg.filters)
                    _check_workload(cfg.filters, self.opts.attributor)
                except FilterError as e:
                    errors[name] = str(e)
        for name, cfg in desired.items():  # first enable: load, outside the engine's lock
            if name in self._sets and cfg.enabled and name not in errors:
                self.ensure_loaded(name, attach=True)
        with self._lock:
            now = time.monotonic()
            for name, st in self._sets.items():
                cfg = desired.get(name)
                want = bool(cfg and cfg.enabled and name not in errors)
                if cfg and name not in errors:
                    st.filters = cfg.filters
                    st.sample_rate = cfg.sample_rate
                if want:
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
            # the maps first, then the control word that makes the kernel consult them
            self._sync_cgroups()
            try:
                self._sync_follow()
            except (libbpf.LibbpfError, OSError) as e:
                for st in self._sets.values():
                    if st.filters.follow:
                        st.error = f"--follow unavailable: {e}"
                        errors[st.spec.name] = st.error
            self._write_control()
            self._sync_consumer()
            return [self._status(name, errors.get(name, "")) for name in self._sets]

    def _sync_cgroups(self) -> None:
        """Write tf_cgroups: every cgroup id a set's filter names (explicit ids, and the
        containers its workload selector matches now) with the bits of those sets. Called on
        apply() and by the attributor after each refresh (pods and cgroups come and go)."""
        want: dict[int, int] = collections.defaultdict(int)
        att = self.opts.attributor
        for st in list(self._sets.values()):
            bit = 1 << int(st.spec.set_id)
            ids = set(st.filters.cgroup_ids)
            if st.filters.workload and att is not None:
                ids |= att.resolve(st.filters.workload)
            for cg in ids:
                want[cg] |= bit
        with self._cg_lock:
            for cg in [c for c in self._cg_written if c not in want]:
                libbpf.map_delete(self.shared.cgroups, ctypes.c_uint64(cg))
                del self._cg_written[cg]
            for cg, bits in want.items():
                if self._cg_written.get(cg) == bits:
                    continue
                try:
                    libbpf.map_update(self.shared.cgroups, ctypes.c_uint64(cg),
                                      ctypes.c_uint64(bits))  # fmt: skip
                    self._cg_written[cg] = bits
                except libbpf.LibbpfError:
                    self.filter_map_full += 1  # E2BIG: --filter-entries too small

    def _sync_follow(self) -> None:
        """Seed tf_follow with each following set's pids and their descendants, and load
        the fork/exit programs that keep it current (once, on the first --follow)."""
        want = {n: st.filters.pids for n, st in self._sets.items() if st.filters.follow}
        if want == self._follow_seeded:
            return
        if want and self._follow_obj is None:
            obj = libbpf.BpfObject(str(self.bpf_dir / "follow.bpf.o"))
            try:
                for mname, mfd in (("tf_control", self.shared.control),
                                   ("tf_stats", self.shared.stats),
                                   ("tf_cgroups", self.shared.cgroups),
                                   ("tf_follow", self.shared.follow)):  # fmt: skip
                    obj.maps[mname].reuse_fd(mfd)
                obj.maps["tf_events"].set_max_entries(4096)  # unused here
                obj.load()
                self._follow_links = [p.attach() for p in obj.programs.values()]
            except BaseException:
                obj.close()
                raise
            self._follow_obj = obj
        # the kernel adds children once the parent is in the map; walking again until
        # nothing new appears catches those forked while an ancestor was being added
        for k in list(libbpf.map_keys(self.shared.follow, ctypes.c_uint32)):
            libbpf.map_delete(self.shared.follow, ctypes.c_uint32(k))
        masks: dict[int, int] = collections.defaultdict(int)
        for name, pids in want.items():
            for p in pids:
                masks[p] |= 1 << int(self._sets[name].spec.set_id)
        written: dict[int, int] = {}
        while True:
            new = {p: m for p, m in masks.items() if written.get(p) != m}
            for p, m in new.items():
                libbpf.map_update(self.shared.follow, ctypes.c_uint32(p), ctypes.c_uint64(m))
                written[p] = m
            if not new:
                break
            masks = _descendants(masks)
        self._follow_seeded = want

    def follow_full(self) -> int:
        """Children not followed because tf_follow was full."""
        if self._follow_obj is None:
            return 0
        v = ctypes.c_uint64()
        libbpf.map_lookup(self._follow_obj.maps["tf_follow_full"].fd, ctypes.c_uint32(0), v)
        return v.value

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

    def kernel_missed(self, name: str) -> tuple[int, int]:
        """(entry, exit) runs of the set's programs the kernel skipped (recursion_misses):
        its per-CPU guard said a BPF program was already running there. The 7.2 guest does
        this under load with either entry rung (1,500 threads parking in openat: sleepable
        121 entries and 404 exits skipped, exit-retry 53 and 106; this 6.18 host: none). A
        skipped entry is a call the filters never saw, of any process (not in ``passed``); a
        skipped exit leaves its entry, reaped once the thread is gone (in ``lost``)."""
        st = self._sets[name]
        if not st.loaded:
            return 0, 0
        entry = exit_ = 0
        for prog, fd in st.loaded.program_fds().items():
            n = libbpf.prog_recursion_misses(fd)
            if "enter" in prog:  # tp_enter_*, tps_enter_*, fs_enter_*, vt_close_enter
                entry += n
            else:
                exit_ += n
        return entry, exit_

    def inflight_count(self, name: str) -> int:
        st = self._sets[name]
        if not st.loaded:
            return 0
        return sum(1 for _ in libbpf.map_keys(st.loaded.map_fd(st.spec.inflight_map),
                                              ctypes.c_uint32))  # fmt: skip

    # ---- events ------------------------------------------------------------------------
    def add_sink(self, sink: EventSink) -> None:
        self._sinks = [*self._sinks, sink]  # copy on write: the consumer thread iterates it
        self._sync_consumer()  # now, not at the next poll: a poll in progress sees it

    def remove_sink(self, sink: EventSink) -> None:
        self._sinks = [s for s in self._sinks if s is not sink]
        self._sync_consumer()

    def _on_record(self, raw: bytes, now: int = 0, flags: int = -1) -> None:
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
                    self._agg.sets.setdefault(name, SetAggregate()).decode_errors += 1
                return
        agg = self._agg.sets.get(name)
        if agg is None:
            agg = self._agg.sets[name] = SetAggregate()
        agg.delivered += 1
        sc = SYSCALL_NAMES.get(syscall, str(syscall))
        agg.events_by_syscall[sc] = agg.events_by_syscall.get(sc, 0) + 1
        agg.latency.observe(max(0, now - ts_ns) / 1e9)
        if self.opts.namespace_budget and self.opts.attributor is not None:
            try:
                self._count_namespace(name, raw)
            except Exception as e:
                self.errors.count(label, "attribution", e)
        if ev is None:
            return
        if fallback:
            ev = self._fallback_event(ev, rec, name, now)
        if self.opts.attributor is not None:
            try:
                self.opts.attributor.annotate(ev)
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

    def _count_namespace(self, name: str, raw: bytes) -> None:
        cg = int.from_bytes(raw[TfHdr.cgroup_id.offset : TfHdr.cgroup_id.offset + 8], "little")
        ns = self.opts.attributor.namespace_of(cg)
        if ns and ns not in self._namespaces:
            if len(self._namespaces) >= self.opts.namespace_budget:
                ns = "_other"
            else:
                self._namespaces.add(ns)
        self.namespace_events[(name, ns)] += 1

    def _fallback_event(
        self, ev: dict[str, Any], rec: ctypes.Structure, name: str, now: int
    ) -> dict[str, Any]:
        """``ev`` with what the user-space fallback recovered; on any failure the affected
        argument stays as the kernel left it, with a ``fallback`` note saying why."""
        try:
            changed, notes = self._apply_fallback(rec, name)
        except Exception as e:
            self.errors.count(name, "fallback", e)
            return ev
        if changed:
            try:
                ev = decode_struct(rec, now)  # re-decode with the recovered values
            except Exception as e:
                self.errors.count(name, "decode", e)
        for arg, note in notes.items():
            if isinstance(ev["args"].get(arg), dict):
                ev["args"][arg]["fallback"] = note
        return ev

    def _fallback_targets(self, rec: ctypes.Structure) -> list[tuple[str, int, int, Any]]:
        """(argument name, offset, size, fix) of each lost argument the fallback may re-read;
        ``fix(tid)`` patches it in ``rec`` and returns its new status, or 0 if it did not."""
        fb = self._fallback

        def lost(arg: TfStr | TfBlob) -> bool:
            return arg.status == Status.LOST and bool(arg.uptr)

        out: list[tuple[str, int, int, Any]] = []
        if isinstance(rec, TfExecEvent):
            # after a successful exec the pointers belong to the old address space
            if rec.hdr.ret == 0:
                return out
            if lost(rec.filename):
                out.append(("filename", TfExecEvent.filename.offset, ctypes.sizeof(TfStr),
                            lambda tid: fb.fix_str(tid, rec.filename)
                            and rec.filename.status))  # fmt: skip
            off = TfExecEvent.argv_uptr.offset
            if rec.argv_status == Status.LOST and rec.argv_uptr:
                out.append(("argv", off, ctypes.sizeof(TfExecEvent) - off,
                            lambda tid: fb.fix_argv(tid, rec) and rec.argv_status))  # fmt: skip
        elif isinstance(rec, TfEvent):
            spec = arg_spec(rec.hdr.event_set, SYSCALL_NAMES.get(rec.hdr.syscall, ""))
            for i, s in enumerate(rec.str):
                if not lost(s):
                    continue
                arg = spec.strs[i] if i < len(spec.strs) else f"str{i}"
                out.append((arg, TfEvent.str.offset + i * ctypes.sizeof(TfStr),
                            ctypes.sizeof(TfStr),
                            lambda tid, s=s: fb.fix_str(tid, s) and s.status))  # fmt: skip
            # a length behind a pointer (accept4) is not re-read
            if spec.blob_len >= 0 and lost(rec.blob):
                n = int(rec.iargs[spec.blob_len])
                out.append((spec.blob or "blob", TfEvent.blob.offset, ctypes.sizeof(TfBlob),
                            lambda tid: fb.fix_blob(tid, rec.blob, n)
                            and rec.blob.status))  # fmt: skip
        return out

    def _apply_fallback(self, rec: ctypes.Structure, set_name: str) -> tuple[bool, dict[str, str]]:
        """Re-read lost arguments from the caller, only if the record's tid still is the task
        that made the call (fallback.Caller). Returns (anything recovered, notes per argument
        for the event). Each argument is contained on its own: a failure restores its bytes."""
        notes: dict[str, str] = {}
        targets = self._fallback_targets(rec)
        if not targets:
            return False, notes
        hdr = rec.hdr
        base = ctypes.addressof(rec)
        saved = bytes(rec)
        try:
            caller = self._fallback.caller(hdr.tid, hdr.pid, hdr.ts_ns)
        except CallerGone as e:
            self.fallback_rejected[(set_name, e.cause)] += 1
            for arg, *_ in targets:
                notes[arg] = e.cause
            return False, notes
        n = truncated = 0
        try:
            for arg, off, size, fix in targets:
                try:
                    status = fix(caller.tid)
                    n += bool(status)
                    truncated += status == Status.TRUNCATED
                except Exception as e:
                    ctypes.memmove(base + off, saved[off : off + size], size)
                    self.errors.count(set_name, "fallback", e)
                    notes[arg] = f"agent error: {type(e).__name__}"
            if n and not caller.alive():
                # it exited during the reads: its tid may have reached another task
                ctypes.memmove(base, saved, len(saved))
                self.fallback_rejected[(set_name, "caller-exited")] += 1
                for arg, *_ in targets:
                    notes.setdefault(arg, "caller-exited")
                return False, notes
        finally:
            caller.close()
        if n:
            self._user_recovered[set_name] += n
            if truncated:
                self._user_recovered[f"{set_name}/truncated"] += truncated
        return bool(n), notes

    def poll_once(self, timeout_ms: int | None = None) -> int:
        self.heartbeat_ns = time.monotonic_ns()
        timeout = self.opts.poll_ms if timeout_ms is None else timeout_ms
        with self._rb_lock:
            if self._rb is not None:
                self._sync_consumer()
                return self._rb.poll(timeout)
        self._stop.wait(timeout / 1000)  # no set loaded yet: nothing to poll
        return 0

    def drain(self) -> int:
        with self._rb_lock:
            if self._rb is None:
                return 0
            self._sync_consumer()
            return self._rb.consume()

    def _sync_consumer(self) -> None:
        """Tell the compiled consumer which records Python needs (sinks, samples, fallback);
        safe during its poll (atomic per-set flags in C)."""
        rb = self._rb
        if isinstance(rb, fastring.FastRing):
            # read and pushed under one lock: the consumer thread's push, computed before an
            # add_sink and delayed, landed after it and one poll's records went uncopied
            with self._sync_lock:
                deliver = bool(self._sinks)
                rb.configure((int(st.spec.set_id), deliver, st.sample_rate, st.user_fallback)
                             for st in self._sets.values())  # fmt: skip

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
                    # outside the poll's try before: one failure here ended the consumer
                    for housekeeping in (self.detach_idle, self.reap_inflight):
                        try:
                            housekeeping()
                        except Exception as e:
                            self.errors.count(ANY_SET, "housekeeping", e)
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
        of records put in the ring (the consumer delivers each once it reads it).
        Outside the identity: ``missed`` (``missed_exit``), the set's entry (exit) program
        runs the kernel skipped (kernel_missed()): calls of any process that never reached
        the filters, so an upper bound of what ``passed`` lacks."""
        k = self.kernel_counters(name)
        missed, missed_exit = self.kernel_missed(name)
        in_flight = self.inflight_count(name)
        lost = k["inflight_full"] + k["inflight_stale"] + self.reaped[name] + self.cleared[name]
        out = {
            "passed": k["passed"],
            "written": k["events"],
            "dropped": k["dropped"],
            "lost": lost,
            "prefix_filtered": k["prefix_filtered"],
            "in_flight": in_flight,
            "missed": missed,
            "missed_exit": missed_exit,
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
            missed = {n: self.kernel_missed(n) for n in self._sets}
            prev_missed, self._last_missed = self._last_missed, missed
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
            # per-program counters, from 0 at each load: below the last value = new programs
            was = prev_missed.get(name, (0, 0))
            m = [c - p if c >= p else c for c, p in zip(missed[name], was, strict=True)]
            if not any(d.values()) and not any(m) and name not in agg.sets:
                continue
            sa = agg.sets.setdefault(name, SetAggregate())
            sa.dropped = d[Stat.DROPPED]
            sa.passed = d[Stat.PASSED]
            deleted = agent_lost[name] - prev_lost.get(name, 0)
            sa.lost = d[Stat.INFLIGHT_FULL] + d[Stat.INFLIGHT_STALE] + deleted
            sa.lost_inflight_full, sa.lost_inflight_stale = (
                d[Stat.INFLIGHT_FULL], d[Stat.INFLIGHT_STALE]
            )  # fmt: skip
            sa.lost_deleted, sa.prefix_filtered = deleted, d[Stat.PREFIX_FILTERED]
            sa.kernel_missed_entry, sa.kernel_missed_exit = m
            strat = st.loaded.strategy.label if st.loaded else "none"
            recovered_user = user.get(name, 0)
            truncated_user = user.get(f"{name}/truncated", 0)
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
            if recovered_user - truncated_user:
                sa.outcomes[("user-fallback", "recovered")] = recovered_user - truncated_user
            if truncated_user:
                sa.outcomes[("user-fallback", "truncated")] = truncated_user
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
            sa.lost_inflight_full, sa.lost_inflight_stale = (
                k[Stat.INFLIGHT_FULL], k[Stat.INFLIGHT_STALE]
            )  # fmt: skip
            sa.lost_deleted = self.reaped[name] + self.cleared[name]
            sa.prefix_filtered = k[Stat.PREFIX_FILTERED]
            sa.kernel_missed_entry, sa.kernel_missed_exit = self.kernel_missed(name)
            strat = st.loaded.strategy.label if st.loaded else "none"
            recovered_user = user.get(name, 0)
            truncated_user = user.get(f"{name}/truncated", 0)
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
                sa.outcomes[("user-fallback", "recovered")] = recovered_user - truncated_user
            if truncated_user:
                sa.outcomes[("user-fallback", "truncated")] = truncated_user
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
        out: list[dict[str, Any]] = []
        while self._samples and len(out) < limit:
            out.append(self._samples.popleft())
        return out

    # ---- report ------------------------------------------------------------------------
    def capabilities(self, *, load: bool = False) -> Mapping[str, Any]:
        """Probe report: per set, the rung it runs (loaded) or will run (planned from the
        feature probes; sets load when first enabled). ``load`` loads every set for real
        first (seconds: the verifier on every program)."""
        probes = self.probes()
        if load:
            for name in self._sets:
                self.ensure_loaded(name)
        sets: dict[str, Any] = {}
        for name, st in self._sets.items():
            attempts, chosen, fallback = st.attempts, None, st.user_fallback
            if st.loaded:
                chosen = st.loaded.strategy.label
            elif not st.error:  # not loaded yet: what the probes allow
                rungs = self._strategies_for(st)
                best, attempts = plan(rungs, {} if st.forced else probes)
                if best is not None:
                    kernel = Strategy.NOFAULT if best == Strategy.USER_FALLBACK else best
                    chosen, fallback = kernel.label, self._with_fallback(st, kernel)
                    feats = ", ".join(RUNG_NEEDS.get(best, ()))
                    why = f"probe passed ({feats}); loads when first enabled"
                    if st.forced:
                        why = "forced, not probed; loads when first enabled"
                    elif not probes:
                        why = "no feature probes (probe.bpf.o not built): tried when enabled"
                    attempts = [*attempts, Attempt(best.label, True, why)]
            better = [a for a in attempts if not a.ok]
            sets[name] = {
                "strategy": chosen,
                "loaded": st.loaded is not None,
                "forced": st.forced.label if st.forced else None,
                "user_fallback": fallback,
                "attempts": [a.__dict__ for a in attempts],
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
                "compiled_consumer": dict(zip(("ok", "reason"), self.consumer(), strict=True)),
                "capabilities": list(self.host.capabilities),
                "probes": {
                    f: {"ok": r.ok, "reason": r.reason, "ms": round(r.ms, 1)}
                    for f, r in probes.items()
                },
            },
            "bpf_dir": str(self.bpf_dir),
            "event_sets": sets,
        }

    def _sleepable_seen(self) -> bool:
        probe = self.probes().get("sleepable-tracepoint")
        if probe is not None and probe.ok:
            return True
        return any(
            a.strategy == "sleepable" and a.ok for st in self._sets.values() for a in st.attempts
        )

    def stop_and_drain(self) -> int:
        """Stop the consumer thread, detach every set (nothing more is written), then hand
        what is still in the rings to the sinks: records a SIGTERM would otherwise leave
        neither exported nor counted. Returns the records drained."""
        self._stop.set()
        if self._rb is not None:
            self._rb.abort()  # a drain in progress stops after its current record
        if self._thread:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                return 0  # never consume beside it; close() says why
        with self._lock:
            for st in self._sets.values():
                if st.loaded and st.loaded.attached:
                    st.loaded.detach()
            with self._rb_lock:
                if self._rb is None:
                    return 0
                self._rb.aborted = False
                try:
                    return self._rb.consume()
                except Exception as e:
                    self.errors.count(ANY_SET, "poll", e)
                    return 0

    def close(self) -> None:
        self._stop.set()
        if self._rb is not None:
            self._rb.abort()  # a drain in progress stops after its current record
        alive = False
        if self._thread:
            self._thread.join(timeout=30)
            alive = self._thread.is_alive()
            if alive:
                log.error("ring buffer consumer did not stop in 30 s; leaving its ring mapped")
        with self._lock:
            for link in self._follow_links:
                link.destroy()
            if self._follow_obj is not None:
                self._follow_obj.close()
                self._follow_obj = None
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
