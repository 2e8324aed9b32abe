"""Accounting: where every call that passed a set's filters went, and the counter stores
behind it. One place reads the kernel's per-set counters (tf_stats), keeps what only the
agent knows (entries it deleted, arguments the fallback recovered or refused, events per
namespace) and hands them out as interval deltas (collect(), the controller client) or
cumulative totals (totals(), /metrics).

The consumer thread adds to the current interval (``agg``) without a lock; collect() swaps
it out under the engine's lock and settles it one collect() later (see collect())."""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from tracefleet.agent.capture.engine import Aggregates, SetAggregate, add_events
from tracefleet.agent.capture.eventsets import EVENT_SETS
from tracefleet.agent.kernel import libbpf
from tracefleet.agent.kernel.abi import TF_SET_MAX, TF_STAT_MAX, Stat

if TYPE_CHECKING:
    from tracefleet.agent.capture.enginestate import SetState

log = logging.getLogger("tracefleet.agent")


def new_aggregates() -> Aggregates:
    now = time.time_ns()
    return Aggregates(interval_start_ns=now, interval_end_ns=now)


class Accounting:
    """Counters of one engine. ``sets`` and ``lock`` are the engine's: set state (loaded,
    strategy) changes under that lock, and collect()/totals() read it under the same."""

    def __init__(self, sets: Mapping[str, SetState], stats_fd: int, lock: threading.RLock):
        self._sets = sets
        self._stats_fd = stats_fd
        self._lock = lock
        self._ncpu = libbpf.num_possible_cpus()
        self.agg = new_aggregates()  # the interval the consumer adds to
        self._last_kernel = self.read_stats()
        # arguments the fallback moved out of lost, per set; key "<set>/truncated": how many
        # of those came out truncated rather than recovered
        self.user_recovered: collections.Counter[str] = collections.Counter()
        # cumulative totals for the metrics endpoint (collect() hands out deltas):
        # intervals settled, the last interval collect() returned, user recoveries so far
        self._cum: dict[str, SetAggregate] = {}
        self._pending = new_aggregates()
        self._cum_user: collections.Counter[str] = collections.Counter()
        # fallback reads refused because the tid no longer is the caller, per (set, cause)
        self.fallback_rejected: collections.Counter[tuple[str, str]] = collections.Counter()
        self.reaped: collections.Counter[str] = collections.Counter()  # reap_inflight()
        self.cleared: collections.Counter[str] = collections.Counter()  # detach clear-out
        # task-storage sets: the kernel's in-flight count when the set was last detached
        # (those calls went into ``cleared``); in flight now is the count above it
        self._inflight_base: collections.Counter[str] = collections.Counter()
        self._last_agent_lost: dict[str, int] = {}  # reaped + cleared at the last collect()
        self._last_missed: dict[str, tuple[int, int]] = {}  # kernel_missed() at the last one
        # (set, namespace) -> events, when opted in (namespace_budget); "" = not in a pod
        self.namespace_events: collections.Counter[tuple[str, str]] = collections.Counter()
        self._run_stats_fd: int | None = None

    def count_recovered(self, set_name: str, n: int, truncated: int) -> None:
        """The user-space fallback recovered ``n`` arguments, ``truncated`` of them cut."""
        self.user_recovered[set_name] += n
        if truncated:
            self.user_recovered[f"{set_name}/truncated"] += truncated

    # ---- the kernel's counters ---------------------------------------------------------
    def read_stats(self) -> list[int]:
        """Sum over CPUs of every kernel counter, indexed set * TF_STAT_MAX + stat."""
        vals = (ctypes.c_uint64 * self._ncpu)()
        out = []
        for key in range(TF_SET_MAX * TF_STAT_MAX):
            libbpf.map_lookup(self._stats_fd, ctypes.c_uint32(key), vals)
            out.append(sum(vals))
        return out

    def kernel_counters(self, name: str) -> dict[str, int]:
        sid = int(EVENT_SETS[name].set_id)
        stats = self.read_stats()
        return {s.name.lower(): stats[sid * TF_STAT_MAX + int(s)] for s in Stat}

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
        if st.spec.inflight_counter:
            return self._inflight_raw(st) - self._inflight_base[name]
        return sum(1 for _ in libbpf.map_keys(st.loaded.map_fd(st.spec.inflight_map),
                                              ctypes.c_uint32))  # fmt: skip

    def _inflight_raw(self, st: SetState) -> int:
        """The kernel's count of calls taken and not completed since load (per-CPU sum)."""
        assert st.loaded
        vals = (ctypes.c_int64 * self._ncpu)()
        libbpf.map_lookup(st.loaded.map_fd(st.spec.inflight_counter), ctypes.c_uint32(0), vals)
        return sum(vals)

    def clear_detached(self, st: SetState) -> int:
        """A task-storage set was detached and its epoch changed: the calls in flight can
        never complete, so they move to ``cleared``; returns how many. An exit that was
        already running completes one of them anyway: it is written, and the in-flight count
        goes below this baseline by one, so the identity holds (and the next clear evens
        ``cleared`` out)."""
        raw = self._inflight_raw(st)
        n = raw - self._inflight_base[st.spec.name]
        self._inflight_base[st.spec.name] = raw
        self.cleared[st.spec.name] += n
        return n

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

    # ---- intervals and totals ----------------------------------------------------------
    def collect(self) -> Aggregates:
        with self._lock:
            agg, self.agg = self.agg, new_aggregates()
            kernel = self.read_stats()
            prev, self._last_kernel = self._last_kernel, kernel
            user, self.user_recovered = self.user_recovered, collections.Counter()
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
            kernel = self.read_stats()
            out: dict[str, SetAggregate] = {}
            for src in (self._cum, self._pending.sets, self.agg.sets):
                for name, sa in list(src.items()):
                    add_events(out.setdefault(name, SetAggregate()), sa)
            user = self._cum_user + self.user_recovered
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

    # ---- program run-time statistics ---------------------------------------------------
    def enable_run_stats(self) -> bool:
        """Turn on the kernel's BPF run-time statistics (run_time_ns, run_cnt per program)
        until close(). System-wide: every BPF program on the host then pays two clock reads
        per run. False (logged) if the kernel refuses."""
        with self._lock:
            if self._run_stats_fd is None:
                try:
                    self._run_stats_fd = libbpf.enable_stats()
                except libbpf.LibbpfError as e:
                    log.warning("cannot enable BPF run-time stats: %s", e)
                    return False
            return True

    @property
    def bpf_stats_enabled(self) -> bool:
        return self._run_stats_fd is not None

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

    def close(self) -> None:
        """Turn the run-time statistics off (the engine closes the stats map itself)."""
        with self._lock:
            if self._run_stats_fd is not None:
                os.close(self._run_stats_fd)
                self._run_stats_fd = None
