"""The seam between the agent's control loop and whatever produces events.

The real engine (``tracefleet.agent.capture.bpfengine.BpfEngine``) loads BPF objects and
flips enable bits in the kernel. ``SyntheticEngine`` of the load generator (``tests/loadgen.py``,
outside the agent) is for fleet-size tests and benchmarks: it produces made-up events and is
never the product path. The controller client (``tracefleet.agent.control.client``) drives
either through this protocol only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# the one filter type of agent and controller (tracefleet.model.filters), named here too
from tracefleet.model.filters import NO_FILTERS, Filters

# one histogram type (and its bounds), one list of outcomes, for agent and controller
from tracefleet.model.histogram import LATENCY_BUCKETS_SECONDS, Histogram
from tracefleet.model.names import OUTCOMES

__all__ = ["LATENCY_BUCKETS_SECONDS", "OUTCOMES", "Filters", "Histogram"]


@dataclass(frozen=True)
class EventSetConfig:
    """Desired state of one event set on this node."""

    name: str
    enabled: bool
    filters: Filters = NO_FILTERS
    sample_rate: float = 0.0  # share of raw events forwarded to the controller (0 = none)
    export: tuple[str, ...] = ()  # exporters that get every event (the client routes them)


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
    # entry (exit) program runs the kernel skipped (recursion guard), outside the identity:
    # a skipped entry's call is not in passed, a skipped exit's ends in lost_deleted
    kernel_missed_entry: int = 0
    kernel_missed_exit: int = 0
    latency: Histogram = field(default_factory=Histogram)  # syscall entry -> decoded in agent


# cumulative totals, shared by the engines and the load generator
def add_events(into: SetAggregate, delta: SetAggregate) -> None:
    """Add the agent-side counts of ``delta`` (delivered, per syscall, latency) into ``into``.
    Kernel-side counts (dropped, outcomes) are not added: engines read them absolute."""
    into.delivered += delta.delivered
    into.decode_errors += delta.decode_errors
    for sc, n in list(delta.events_by_syscall.items()):
        into.events_by_syscall[sc] = into.events_by_syscall.get(sc, 0) + n
    into.latency.add(delta.latency)


def add_all(into: SetAggregate, delta: SetAggregate) -> None:
    """Add every count of ``delta`` into ``into`` (for engines without kernel counters)."""
    add_events(into, delta)
    into.dropped += delta.dropped
    for key, n in list(delta.outcomes.items()):
        into.outcomes[key] = into.outcomes.get(key, 0) + n


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


@runtime_checkable
class SinkEngine(Protocol):
    """An engine that can hand every decoded event to sinks (the exporters)."""

    def add_sink(self, sink: Any) -> None: ...

    def remove_sink(self, sink: Any) -> None: ...
