"""LOAD GENERATOR: a made-up CaptureEngine and N simulated agents in one process.

``SyntheticEngine`` invents events (no BPF, no kernel); it exists to test and benchmark the
controller at fleet size and is never the product path. Run simulated agents with::

    python tests/loadgen.py --agents 1000 --controller 127.0.0.1:7070 \\
        --roles db,web,cache

Every agent registers with the strategy "synthetic" and reason "load generator".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tracefleet.agent.capture.engine import (
    Aggregates,
    CaptureEngine,
    EventSetConfig,
    SetAggregate,
    SetStatus,
    add_all,
)
from tracefleet.agent.control.client import ClientOptions, ControlClient
from tracefleet.controller.api.wakeups import coalesce_grpc_wakeups
from tracefleet.model.histogram import LATENCY_BUCKETS_SECONDS, Histogram
from tracefleet.model.labels import parse_labels
from tracefleet.model.names import STRATEGY_SYNTHETIC

SYSCALLS: dict[str, tuple[str, ...]] = {
    "file": ("openat", "read", "write", "close", "statx"),
    "exec": ("execve", "execveat"),
    "net": ("connect", "accept4", "sendto", "recvfrom"),
    "vfs": ("vfs_open", "vfs_read", "vfs_write"),
}
STRATEGY = STRATEGY_SYNTHETIC
COMMS = ("postgres", "nginx", "python3", "bash", "java")
PIDS = tuple(range(4000, 4016))
# Share of events per latency bucket: a made-up log-normal-ish shape around 10-50 us.
_SHAPE = (0, 0, 1, 4, 20, 30, 20, 10, 6, 4, 2, 1, 1, 0.5, 0.3, 0.1, 0.05, 0.03, 0.02, 0, 0, 0, 0)
_OUTCOME_SHARE = {"ok": 0.96, "recovered": 0.03, "lost": 0.008, "truncated": 0.002}


class SyntheticEngine(CaptureEngine):
    """CaptureEngine producing made-up events at ``rate`` events/s per enabled set."""

    def __init__(
        self,
        rate: float = 50.0,
        *,
        seed: int | None = None,
        fail_sets: Sequence[str] = (),
        event_sets: Sequence[str] = tuple(SYSCALLS),
    ) -> None:
        self.rate = rate
        self.fail_sets = frozenset(fail_sets)
        self._sets = tuple(event_sets)
        self._rng = random.Random(seed)
        self._config: dict[str, EventSetConfig] = {}
        self._last_collect = time.time_ns()
        self._last_sample = time.monotonic()
        self.apply_calls = 0
        self.closed = False
        # what collect() handed out, as the number of intervals of each (set, event count)
        # (totals() multiplies them out), and the events invented per set
        self._made: collections.Counter[tuple[str, int]] = collections.Counter()
        self._produced: dict[str, int] = {}

    # CaptureEngine ----------------------------------------------------------------------

    def consumer(self) -> tuple[bool, str]:
        return False, "synthetic engine: no ring buffer"

    def capabilities(self) -> Mapping[str, Any]:
        return {
            "engine": "synthetic",
            "load_generator": True,
            "kernel_version": platform.release(),
            "event_sets": {
                name: {"strategy": STRATEGY, "reason": "load generator", "available": [STRATEGY]}
                for name in self._sets
            },
        }

    def event_sets(self) -> Sequence[str]:
        return self._sets

    def apply(self, desired: Mapping[str, EventSetConfig]) -> Sequence[SetStatus]:
        self.apply_calls += 1
        # the configs by identity: the clients of a process share the objects of one
        # desired state, so 1,000 simulated agents applying a change build its result once
        key = (self._sets, self.fail_sets, tuple((n, id(c)) for n, c in desired.items()))
        hit = _APPLIED.get(key)
        if hit is None:
            if len(_APPLIED) >= _APPLIED_MAX:
                _APPLIED.clear()
            # the configs are kept with the result: their ids are not reused meanwhile
            hit = _APPLIED[key] = (tuple(desired.values()), *self._apply(desired))
        self._config = hit[1]
        return list(hit[2])

    def _apply(
        self, desired: Mapping[str, EventSetConfig]
    ) -> tuple[dict[str, EventSetConfig], tuple[SetStatus, ...]]:
        out = []
        config = {}
        for name in self._sets:
            cfg = desired.get(name) or EventSetConfig(name, False)
            if cfg.enabled and name in self.fail_sets:
                out.append(SetStatus(name, True, False, STRATEGY, "synthetic failure (fail_sets)"))
                continue
            config[name] = cfg
            out.append(SetStatus(name, cfg.enabled, cfg.enabled, STRATEGY))
        for name in sorted(set(desired) - set(self._sets)):
            out.append(SetStatus(name, desired[name].enabled, False, "", "unknown event set"))
        return config, tuple(out)

    def enabled(self) -> list[str]:
        return [n for n, c in self._config.items() if c.enabled]

    def collect(self) -> Aggregates:
        now = time.time_ns()
        start, self._last_collect = self._last_collect, now
        elapsed = max(0.0, (now - start) / 1e9)
        agg = Aggregates(start, now)
        for name in self.enabled():
            n = self._count(self.rate * elapsed)
            # a copy of the shared one: its counts are the caller's (a test sets some); its
            # dicts and histogram stay shared, read only
            s = agg.sets[name] = dataclasses.replace(_aggregate(name, n))
            self._made[(name, n)] += 1
            self._produced[name] = self._produced.get(name, 0) + s.delivered + s.dropped
        return agg

    def totals(self) -> dict[str, SetAggregate]:
        """Everything collect() has reported so far (cumulative; events are invented there)."""
        out: dict[str, SetAggregate] = {}
        for (name, n), k in sorted(self._made.items()):
            add_all(out.setdefault(name, SetAggregate()), _times(_aggregate(name, n), k))
        return out

    def produced(self) -> dict[str, int]:
        """Events invented per set (delivered + dropped of totals()), without building them."""
        return dict(self._produced)

    def sample_events(self, limit: int) -> list[dict[str, Any]]:
        now = time.monotonic()
        elapsed, self._last_sample = now - self._last_sample, now
        out: list[dict[str, Any]] = []
        for name in self.enabled():
            cfg = self._config[name]
            if cfg.sample_rate <= 0:
                continue
            k = min(limit - len(out), max(1, round(self.rate * elapsed * cfg.sample_rate)))
            out.extend(self._event(cfg) for _ in range(max(0, k)))
        return out

    def close(self) -> None:
        self.closed = True

    # made-up data -----------------------------------------------------------------------

    def _count(self, mean: float) -> int:
        return max(0, round(self._rng.gauss(mean, math.sqrt(mean)))) if mean > 0 else 0

    def _event(self, cfg: EventSetConfig) -> dict[str, Any]:
        f = cfg.filters
        rng = self._rng
        pid = rng.choice(f.pids or PIDS)
        syscall = rng.choice(SYSCALLS.get(cfg.name, ("syscall",)))
        prefix = rng.choice(f.path_prefixes or ("/etc", "/var/lib", "/tmp"))
        path = f"{prefix.rstrip('/')}/synthetic-{rng.randrange(1000)}"
        status = "ok" if rng.random() < 0.97 else "recovered"
        return {
            "ts_ns": time.time_ns(),
            "event_set": cfg.name,
            "syscall": syscall,
            "pid": pid,
            "tid": pid,
            "comm": rng.choice(f.comms or COMMS),
            "ret": rng.randrange(0, 64),
            "args": {"path": {"value": path, "status": status, "strategy": STRATEGY}},
        }


# SyntheticEngine.apply()'s results (configs kept, statuses) by the engine's sets, its
# failing sets and the identities of the configs asked for; read only.
_APPLIED: dict[
    tuple[tuple[str, ...], frozenset[str], tuple[tuple[str, int], ...]],
    tuple[tuple[EventSetConfig, ...], dict[str, EventSetConfig], tuple[SetStatus, ...]],
] = {}
_APPLIED_MAX = 64


# One SetAggregate per (set, event count), shared by every engine of the process: collect()
# hands a shallow copy to every agent that invented that many events (building one per agent
# and interval was a fifth of a simulated agent's CPU); its dicts and histogram never change.
_AGGREGATES: dict[tuple[str, int], SetAggregate] = {}
_AGGREGATES_MAX = 8192  # counts past that many are built each time


def _aggregate(name: str, n: int) -> SetAggregate:
    s = _AGGREGATES.get((name, n))
    if s is None:
        s = _build_aggregate(name, n)
        if len(_AGGREGATES) < _AGGREGATES_MAX:
            _AGGREGATES[(name, n)] = s
    return s


def _build_aggregate(name: str, n: int) -> SetAggregate:
    s = SetAggregate()
    syscalls = SYSCALLS.get(name, ("syscall",))
    per, rest = divmod(n, len(syscalls))
    for i, sc in enumerate(syscalls):
        s.events_by_syscall[sc] = per + (1 if i < rest else 0)
    left = n
    for outcome in _OUTCOME_SHARE:
        c = int(n * _OUTCOME_SHARE[outcome])
        s.outcomes[(STRATEGY, outcome)] = c
        left -= c
    s.outcomes[(STRATEGY, "ok")] = left
    s.delivered = n
    s.dropped = n // 500
    s.latency = _histogram(n)
    return s


def _times(s: SetAggregate, k: int) -> SetAggregate:
    """``k`` intervals of ``s`` (the counts a synthetic aggregate has, times k)."""
    out = SetAggregate(delivered=s.delivered * k, dropped=s.dropped * k)
    out.events_by_syscall = {sc: c * k for sc, c in s.events_by_syscall.items()}
    out.outcomes = {key: c * k for key, c in s.outcomes.items()}
    out.latency = Histogram(s.latency.bounds, [c * k for c in s.latency.counts], s.latency.sum * k)
    return out


def _histogram(n: int) -> Histogram:
    """n observations spread over the buckets by _SHAPE, exactly n in total."""
    h = Histogram()
    total = sum(_SHAPE)
    counts = [int(n * w / total) for w in _SHAPE]
    counts[5] += n - sum(counts)
    h.counts = counts
    mids = [
        (LATENCY_BUCKETS_SECONDS[i - 1] if i else 0.0) / 2 + LATENCY_BUCKETS_SECONDS[i] / 2
        if i < len(LATENCY_BUCKETS_SECONDS)
        else LATENCY_BUCKETS_SECONDS[-1]
        for i in range(len(counts))
    ]
    h.sum = sum(c * m for c, m in zip(counts, mids, strict=True))
    return h


# many agents in one process ----------------------------------------------------------------


def simulated_nodes(
    count: int, prefix: str, roles: Sequence[str], labels: Mapping[str, str]
) -> list[tuple[str, dict[str, str]]]:
    """(name, labels) of ``count`` nodes; roles are assigned round-robin."""
    nodes = []
    for i in range(count):
        lab = dict(labels)
        if roles:
            lab["role"] = roles[i % len(roles)]
        nodes.append((f"{prefix}-{i:04d}" if count > 1 or not prefix else prefix, lab))
    return nodes


async def run_simulated(
    controller: str | Sequence[str],
    nodes: Sequence[tuple[str, Mapping[str, str]]],
    stop: asyncio.Event,
    *,
    rate: float = 50.0,
    options: ClientOptions | None = None,
    fail_sets: Sequence[str] = (),
    ramp: float = 0.0,
    stats_file: str = "",
) -> list[ControlClient]:
    """Run one ControlClient with a SyntheticEngine per node until ``stop`` is set. Several
    ``controller`` addresses: replicas, each agent dials first the one its name hashes to."""
    opts = options or ClientOptions(offload_engine_calls=False, agent_version="loadgen")
    clients = [
        ControlClient(
            SyntheticEngine(rate, seed=hash(name) & 0xFFFF, fail_sets=fail_sets),
            controller,
            name,
            labels,
            opts,
        )
        for name, labels in nodes
    ]

    # the clients live as long as the process: out of the collector's reach (a full
    # collection walked them all during the changes it simulates)
    gc.collect()
    gc.freeze()
    # and the collector runs less often: every message of every agent allocates, and a
    # collection per 700 allocations cost ~15% of the CPU of a change (cycles are rare
    # here; reference counting frees the rest at once)
    gc.set_threshold(50_000, 50, 100)

    async def one(i: int, c: ControlClient) -> None:
        if ramp > 0:
            await asyncio.sleep(ramp * i / max(1, len(clients)))
        await c.run(stop)

    writer = None
    if stats_file:

        async def write_stats() -> None:
            while True:
                _write_stats(stats_file, clients)
                await asyncio.sleep(0.25)

        writer = asyncio.create_task(write_stats())
    try:
        await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    finally:
        if writer is not None:
            writer.cancel()
            _write_stats(stats_file, clients)
    return clients


def client_stats(c: ControlClient) -> dict[str, Any]:
    engine = c.engine if isinstance(c.engine, SyntheticEngine) else None
    return {
        "node": c.node_name,
        "connected": c.connected,
        "controller": c.controller,
        "applied_generation": c.applied_generation,
        "enabled": engine.enabled() if engine is not None else [],
        # events invented so far per set (delivered + dropped), what the controller must
        # count once every batch is acknowledged (`unacked` 0)
        "produced": engine.produced() if engine is not None else {},
        "unacked": c.outbox_state()[0],
        **dataclasses.asdict(c.stats),
    }


def _write_stats(path: str, clients: Sequence[ControlClient]) -> None:
    """Counters of every client as JSON, replaced atomically (tests and benchmarks read it)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump([client_stats(c) for c in clients], f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tests/loadgen.py",
        description="LOAD GENERATOR: run N simulated agents (made-up events) against a "
        "controller. Not the product path.",
    )
    p.add_argument("--controller", required=True,
                   help="controller host:port, or replicas' host:port,host:port,...")  # fmt: skip
    p.add_argument("--agents", type=int, default=1)
    p.add_argument("--name", default="sim", help="node name (one agent) or prefix (several)")
    p.add_argument("--roles", default="", help="comma-separated roles assigned round-robin")
    p.add_argument("--labels", default="", help="labels of every agent: k=v[,k=v]")
    p.add_argument("--rate", type=float, default=50.0, help="events/s per enabled set")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between batches")
    p.add_argument("--backoff-max", type=float, default=30.0)
    p.add_argument("--buffer-budget", type=int, default=600)
    p.add_argument("--fail-sets", default="", help="event sets whose apply fails")
    p.add_argument("--ramp", type=float, default=0.0, help="spread agent starts over seconds")
    p.add_argument("--duration", type=float, default=0.0, help="stop after seconds (0: never)")
    p.add_argument("--stats-file", default="", help="keep the clients' counters here (JSON)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        labels = parse_labels(args.labels)
    except ValueError as e:
        p.error(str(e))
    nodes = simulated_nodes(args.agents, args.name, [r for r in args.roles.split(",") if r], labels)
    options = ClientOptions(
        interval=args.interval,
        backoff_max=args.backoff_max,
        buffer_budget=args.buffer_budget,
        offload_engine_calls=False,
        agent_version="loadgen",
    )

    async def amain() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # one loop wakeup per burst of gRPC completions, as in the controller: a change is
        # a read and a write on every simulated agent's stream
        coalesce_grpc_wakeups(loop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        if args.duration > 0:
            loop.call_later(args.duration, stop.set)
        print(
            f"loadgen: {len(nodes)} simulated agent(s) -> {args.controller}",
            file=sys.stderr,
            flush=True,
        )
        await run_simulated(
            [a for a in args.controller.split(",") if a],
            nodes,
            stop,
            rate=args.rate,
            options=options,
            fail_sets=[s for s in args.fail_sets.split(",") if s],
            ramp=args.ramp,
            stats_file=args.stats_file,
        )

    asyncio.run(amain())
    return 0


if __name__ == "__main__":
    sys.exit(main())
