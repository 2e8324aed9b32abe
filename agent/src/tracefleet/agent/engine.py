"""The seam between the agent's control loop and whatever produces events.

The real engine (``tracefleet.agent.capture.BpfEngine``) loads BPF objects and flips enable
bits in the kernel. ``tracefleet.agent._internal.loadgen.SyntheticEngine`` is a load
generator for fleet-size tests and benchmarks: it produces made-up events and is never used
as the product path. The controller client (``tracefleet.agent.controlclient``) drives either
through this protocol only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Capture-latency histogram bounds (seconds), shared by every engine so the controller can
# add histograms bucket by bucket. The last bucket is +Inf (implicit).
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

OUTCOMES: tuple[str, ...] = ("ok", "recovered", "lost", "truncated")


@dataclass(frozen=True)
class Filters:
    """In-kernel filters of one event set; empty means no filtering."""

    pids: tuple[int, ...] = ()
    comms: tuple[str, ...] = ()
    cgroup_ids: tuple[int, ...] = ()
    path_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EventSetConfig:
    """Desired state of one event set on this node."""

    name: str
    enabled: bool
    filters: Filters = Filters()
    sample_rate: float = 0.0  # share of raw events forwarded to the controller (0 = none)
    export: tuple[str, ...] = ()  # exporters that get every event (the client routes them)


@dataclass
class Histogram:
    """Cumulative-free histogram: counts[i] counts values <= bounds[i]; the last is +Inf."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_SECONDS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_SECONDS) + 1))
    total: float = 0.0  # sum of observed values

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.bounds) and value > self.bounds[i]:
            i += 1
        self.counts[i] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class SetAggregate:
    """What one event set did during one interval on one node."""

    events_by_syscall: dict[str, int] = field(default_factory=dict)
    # (strategy, outcome) -> captured arguments
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    delivered: int = 0
    dropped: int = 0  # ring buffer full or consumer lag, counted in the kernel
    # calls that passed the filters (kernel count at syscall entry; syscall sets only) and
    # those counted lost before reaching the ring (in-flight map full, slot of a dead
    # thread, entries deleted by the agent): passed = written + dropped + lost +
    # prefix-filtered + in flight
    passed: int = 0
    lost: int = 0
    # parts: lost = lost_inflight_full + lost_inflight_stale + lost_deleted
    lost_inflight_full: int = 0
    lost_inflight_stale: int = 0
    lost_deleted: int = 0
    prefix_filtered: int = 0  # dropped at exit by the path-prefix filter (in the kernel)
    decode_errors: int = 0  # records read but not decodable: not delivered
    latency: Histogram = field(default_factory=Histogram)  # syscall entry -> decoded in agent


@dataclass
class Aggregates:
    interval_start_ns: int
    interval_end_ns: int
    sets: dict[str, SetAggregate] = field(default_factory=dict)


@dataclass(frozen=True)
class SetStatus:
    """What the engine actually applied for one event set."""

    name: str
    enabled: bool
    attached: bool
    strategy: str  # e.g. "sleepable", "exit-retry", "nofault", "synthetic"
    error: str = ""  # why the set is not in the desired state, if it is not


class CaptureEngine(Protocol):
    def capabilities(self) -> Mapping[str, Any]:
        """Probe report: kernel version, BPF features, strategy per event set with reasons."""
        ...

    def event_sets(self) -> Sequence[str]:
        """Names of the event sets this engine knows."""
        ...

    def apply(self, desired: Mapping[str, EventSetConfig]) -> Sequence[SetStatus]:
        """Make the kernel match ``desired``; sets not named are disabled. Never raises for one
        bad set: its SetStatus carries the error."""
        ...

    def collect(self) -> Aggregates:
        """Aggregates since the previous call (deltas)."""
        ...

    def sample_events(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` raw events decoded since the previous call, as JSON-ready dicts with
        ts_ns, event_set, syscall, pid, tid, comm, ret and args {name: {value, status,
        strategy}}."""
        ...

    def close(self) -> None: ...
