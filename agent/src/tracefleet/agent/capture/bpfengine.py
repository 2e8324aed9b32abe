"""BpfEngine: the real capture engine. Loads event sets through the ladder, flips their enable
bits, keeps their filters (control word, cgroup and follow maps) current, and composes the
ring consumer (capture/consumer.py), the user-space fallback (capture/fallback.py) and
the counters (capture/accounting.py).

Life of an event set: loaded (verified) when first enabled, at the best rung the feature
probes allow (``ladder.probe_features``: each run once, only those its rungs need) ->
attached when enabled -> bit cleared at once when disabled -> detached after
``hold_seconds`` if it stays disabled (an attached syscall tracepoint costs every syscall on
the host even with its bit off) -> re-attached, without a reload, when enabled again.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tracefleet.agent.capture import fastring
from tracefleet.agent.capture.accounting import Accounting
from tracefleet.agent.capture.consumer import RingConsumer
from tracefleet.agent.capture.contain import ANY_SET, ErrorCounter
from tracefleet.agent.capture.engine import (
    Aggregates,
    CaptureEngine,
    EventSetConfig,
    EventSink,
    Filters,
    SetAggregate,
    SetStatus,
)
from tracefleet.agent.capture.enginestate import EngineOptions as EngineOptions  # callers' import
from tracefleet.agent.capture.enginestate import SetState
from tracefleet.agent.capture.eventsets import EVENT_SETS
from tracefleet.agent.capture.exe import ExeResolver
from tracefleet.agent.capture.fallback import RecordFallback, UserFallback
from tracefleet.agent.capture.jsonfmt import JsonFormatter
from tracefleet.agent.capture.ladder import (
    FEATURE_PROBES,
    LADDER,
    RUNG_NEEDS,
    Attempt,
    LadderExhausted,
    ProbeResult,
    SharedMaps,
    features_for,
    load_set,
    plan,
    probe_features,
)
from tracefleet.agent.kernel import libbpf
from tracefleet.agent.kernel.abi import (
    TF_SET_MAX,
    TF_STAT_MAX,
    Strategy,
    TfControl,
    TfExeKey,
    TfStr,
)
from tracefleet.agent.kernel.hostcheck import HostInfo, btf_has_name, check_host
from tracefleet.agent.kernel.kfilter import to_kernel
from tracefleet.model.filters import FilterError

log = logging.getLogger("tracefleet.agent")


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


class BpfEngine(CaptureEngine):
    """Capture on this host's kernel. Thread-safe: apply() from the control thread, events
    from the consumer thread started by start(). Owns the set lifecycle (load, attach,
    detach, filters, cgroups, follow); the ring consumer (``ring``), the user-space fallback
    and the counters (``acct``) are their own classes, composed here."""

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
            events=-1,  # one ring per set, created when the set loads (RingConsumer.ring_for)
            stats=self._create(libbpf.BPF_MAP_TYPE_PERCPU_ARRAY, "tf_stats", 4, 8,
                               TF_SET_MAX * TF_STAT_MAX),
            cgroups=self._create(libbpf.BPF_MAP_TYPE_HASH, "tf_cgroups", 8, 8,
                                 self.opts.filter_entries),
            follow=self._create(libbpf.BPF_MAP_TYPE_HASH, "tf_follow", 4, 8,
                                self.opts.filter_entries),
            exes=self._create(libbpf.BPF_MAP_TYPE_LRU_HASH, "tf_exes",
                              ctypes.sizeof(TfExeKey), ctypes.sizeof(TfStr),
                              self.opts.exe_entries),
        )  # fmt: skip
        self.exes = ExeResolver(self.shared.exes)
        self._cg_lock = threading.Lock()
        self._cg_written: dict[int, int] = {}  # tf_cgroups as last written
        self._follow_obj: libbpf.BpfObject | None = None
        self._follow_links: list[libbpf.Link] = []
        self._follow_seeded: dict[str, tuple[int, ...]] = {}
        self.filter_map_full = 0  # cgroup ids the kernel map refused (full), counted
        if self.opts.attributor is not None:
            self.opts.attributor.add_listener(self._sync_cgroups)
        self._sets = {
            name: SetState(spec)
            for name, spec in EVENT_SETS.items()
            if not self.opts.sets or name in self.opts.sets
        }
        for name, strat in self.opts.strategies.items():
            self._sets[name].forced = strat
        self._probes: dict[str, ProbeResult] = {}  # replaced, never changed: read unlocked
        self._no_probe_object = False  # probe.bpf.o not built: every rung is tried for real
        self._errors = ErrorCounter()  # contained per-record failures, per (set, cause)
        self.acct = Accounting(self._sets, self.shared.stats, self._lock)
        self._fallback = UserFallback()
        record_fallback = RecordFallback(self._fallback, self._errors, self.acct.count_recovered,
                                         self.acct.fallback_rejected)  # fmt: skip
        self.ring = RingConsumer(self.opts, self._sets, self.acct, record_fallback, self._errors,
                                 self._create, self._housekeeping, self._lock,
                                 self.exes)  # fmt: skip
        self._write_control()

    # ---- setup -------------------------------------------------------------------------
    def _create(self, mtype: int, name: str, ksz: int, vsz: int, n: int) -> int:
        fd = libbpf.map_create(mtype, name, ksz, vsz, n)
        self._fds.append(fd)
        return fd

    def consumer(self) -> tuple[bool, str]:
        """(compiled consumer in use, why): fastring where it loads, else the Python one."""
        return self.ring.kind()

    def _strategies_for(self, st: SetState) -> tuple[Strategy, ...]:
        return (st.forced,) if st.forced else (st.spec.ladder or LADDER)

    def probes(self, features: Sequence[str] | None = None) -> dict[str, ProbeResult]:
        """What this kernel allows, from the feature probes (``features``, default all):
        each run once, when first asked for (milliseconds each)."""
        want = [fp.feature for fp in FEATURE_PROBES] if features is None else list(features)
        probes = self._probes
        if all(f in probes for f in want):  # never wait behind a set being loaded
            return {f: probes[f] for f in want}
        with self._lock:
            missing = [f for f in want if f not in self._probes]
            if missing and not self._no_probe_object:
                found = probe_features(self.bpf_dir, missing)
                self._no_probe_object = not found
                self._probes = {**self._probes, **found}
            return {f: self._probes[f] for f in want if f in self._probes}

    def _with_fallback(self, st: SetState, kernel: Strategy) -> bool:
        if st.forced:
            want = st.forced == Strategy.USER_FALLBACK
        else:
            want = self.opts.user_fallback and kernel in (Strategy.EXIT_RETRY, Strategy.NOFAULT)
        return want and self._fallback.available

    def ensure_loaded(self, name: str, *, attach: bool = False) -> SetState:
        """Load a set through the ladder (once), from the best rung the probes allow (a
        forced rung is tried as asked). With ``attach`` its programs stay attached (the set
        is being enabled). Failure is recorded in the state. The verifier takes seconds (tens
        in an emulated guest): it runs outside the engine's lock, so collect(), statuses()
        and the consumer, hence the agent's heartbeat to its controller, go on meanwhile."""
        with self._load_lock:
            st = self._sets[name]
            if st.loaded or st.error:
                return st
            probes = None if st.forced else self.probes(features_for(self._strategies_for(st)))
            try:
                loaded = load_set(
                    st.spec,
                    self.bpf_dir,
                    dataclasses.replace(self.shared, events=self.ring.ring_for(name)),
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
            ctl.epoch[int(st.spec.set_id)] = st.epoch
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
            self.ring.sync()
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

    def _drop_inflight(self, st: SetState, only: Callable[[int], bool] | None = None) -> int:
        """Delete the set's per-thread entries (those whose tid passes ``only``, else all);
        returns how many were deleted."""
        assert st.loaded
        fd = st.loaded.map_fd(st.spec.inflight_map)
        n = 0
        for tid in list(libbpf.map_keys(fd, ctypes.c_uint32)):
            if (only is None or only(tid)) and libbpf.map_delete(fd, ctypes.c_uint32(tid)):
                n += 1
        return n

    def _clear_inflight(self, st: SetState) -> None:
        """Per-thread state of a detached set can never complete: drop it (counted: those
        calls passed the filters and are neither delivered nor dropped). Task storage
        cannot be enumerated: a new epoch frees its slots in the kernel (an exit still
        running may have read the old one: Accounting.clear_detached)."""
        if not st.spec.inflight_map:
            st.epoch += 1
            self._write_control()
            self.acct.clear_detached(st)
            return
        self.acct.cleared[st.spec.name] += self._drop_inflight(st)

    def reap_inflight(self) -> dict[str, int]:
        """Drop the per-thread entries of threads that no longer exist; returns how many per
        set (also added to ``acct.reaped``). The kernel deletes an entry at the syscall's exit;
        a thread that dies without one (on the 7.2 guest, a thread killed by a sibling's exec
        while blocked in a syscall left one) would otherwise hold its slot for good
        (the in-flight maps are plain hashes: an LRU would evict live calls silently). Tids
        are the kernel's (init PID namespace): the agent runs with hostPID, as its own-pid
        filter already requires."""
        out: dict[str, int] = {}
        with self._lock:
            for name, st in self._sets.items():
                if not st.loaded or not st.spec.inflight_map:
                    continue  # task storage is freed with its thread (tp_thread_exit)
                n = self._drop_inflight(st, lambda tid: not os.path.exists(f"/proc/{tid}"))
                if n:
                    out[name] = n
        for name, n in out.items():
            self.acct.reaped[name] += n
            log.debug("event set %s: dropped %d in-flight entries of dead threads", name, n)
        return out

    def _housekeeping(self) -> None:
        """Once a second from the consumer thread, holding the engine's lock. Each task is
        contained: one failure here used to end the consumer."""
        for task in (self.detach_idle, self.reap_inflight):
            try:
                task()
            except Exception as e:
                self._errors.count(ANY_SET, "housekeeping", e)

    # ---- the consumer (RingConsumer) ---------------------------------------------------
    def add_sink(self, sink: EventSink) -> None:
        self.ring.add_sink(sink)

    def remove_sink(self, sink: EventSink) -> None:
        self.ring.remove_sink(sink)

    def compiled_jsonl(self, fd: int, sink: EventSink) -> JsonFormatter | None:
        """capture -o jsonl: lines rendered in C to ``fd`` while ``sink`` is the only sink
        (RingConsumer.compiled_jsonl); None where that does not run."""
        return self.ring.compiled_jsonl(fd, sink)

    def jsonl_counts(self) -> dict[str, Any] | None:
        return self.ring.jsonl_counts()

    def decode(self) -> tuple[bool, str]:
        """(compiled decode in use, why): cdecode where it loads, else decode.py per record."""
        return self.ring.decode_kind()

    def decode_counts(self) -> dict[str, Any] | None:
        """Records the compiled decode made into events, and those it left to Python (why)."""
        return self.ring.decode_counts()

    def sample_events(self, limit: int) -> list[dict[str, Any]]:
        return self.ring.sample_events(limit)

    def poll_once(self, timeout_ms: int | None = None) -> int:
        return self.ring.poll_once(timeout_ms)

    def drain(self) -> int:
        return self.ring.drain()

    def start(self) -> None:
        self.ring.start()

    def health(self) -> tuple[bool, str]:
        return self.ring.health()

    @property
    def _rb(self) -> libbpf.RingBuffer | fastring.FastRing | None:
        return self.ring.rb  # tests reach the ring buffer object through the engine

    # ---- counters (Accounting) ---------------------------------------------------------
    def kernel_counters(self, name: str) -> dict[str, int]:
        return self.acct.kernel_counters(name)

    @property
    def errors(self) -> ErrorCounter:
        return self._errors

    def kernel_missed(self, name: str) -> tuple[int, int] | None:
        if name not in self._sets:  # a set of another engine (user_events): no programs
            return None
        return self.acct.kernel_missed(name)

    def inflight_count(self, name: str) -> int:
        return self.acct.inflight_count(name)

    def accounting(self, name: str) -> dict[str, int]:
        return self.acct.accounting(name)

    def collect(self) -> Aggregates:
        return self.acct.collect()

    def totals(self) -> dict[str, SetAggregate]:
        return self.acct.totals()

    def enable_run_stats(self) -> bool:
        return self.acct.enable_run_stats()

    @property
    def bpf_stats_enabled(self) -> bool:
        return self.acct.bpf_stats_enabled

    def program_stats(self) -> list[tuple[str, str, int, int]]:
        return self.acct.program_stats()

    @property
    def reaped(self) -> collections.Counter[str]:
        return self.acct.reaped

    @property
    def fallback_rejected(self) -> collections.Counter[tuple[str, str]]:
        return self.acct.fallback_rejected

    @property
    def namespace_events(self) -> collections.Counter[tuple[str, str]]:
        return self.acct.namespace_events

    def attribution_unknown(self) -> collections.Counter[str] | None:
        att = self.opts.attributor
        return None if att is None else att.unknown

    def exe_unknown(self) -> dict[str, int]:
        out = self.exes.counts()
        for cause, n in self.ring.exe_unknown_compiled().items():  # the compiled jsonl lines
            out[cause] = out.get(cause, 0) + n
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
                "compiled_decode": dict(zip(("ok", "reason"), self.decode(), strict=True)),
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
        probe = self.probes(["sleepable-tracepoint"]).get("sleepable-tracepoint")
        if probe is not None and probe.ok:
            return True
        return any(
            a.strategy == "sleepable" and a.ok for st in self._sets.values() for a in st.attempts
        )

    def stop_and_drain(self) -> int:
        """Stop the consumer thread, detach every set (nothing more is written), then hand
        what is still in the rings to the sinks: records a SIGTERM would otherwise leave
        neither exported nor counted. Returns the records drained."""
        if not self.ring.stop():
            return 0  # never consume beside it; close() says why
        with self._lock:
            for st in self._sets.values():
                if st.loaded and st.loaded.attached:
                    st.loaded.detach()
            return self.ring.final_drain()

    def close(self) -> None:
        stopped = self.ring.stop()
        if not stopped:
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
            if stopped:  # never unmap a ring under a consumer
                self.ring.close()
            self.acct.close()
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> BpfEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
