"""The seam between the agent's control loop and whatever produces events.

The real engine (``tracefleet.agent.capture.bpfengine.BpfEngine``) loads BPF objects and
flips enable bits in the kernel. ``SyntheticEngine`` of the load generator (``tests/loadgen.py``,
outside the agent) is for fleet-size tests and benchmarks: it produces made-up events and is
never the product path. The controller client (``tracefleet.agent.control.client``) and the metrics
collector drive each through ``CaptureEngine`` only.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# the one filter type of agent and controller (tracefleet.model.filters), named here too
from tracefleet.model.filters import NO_FILTERS, Filters

# one histogram type (and its bounds), one list of outcomes, for agent and controller
from tracefleet.model.histogram import LATENCY_BUCKETS_SECONDS, Histogram
from tracefleet.model.names import OUTCOMES

if TYPE_CHECKING:  # annotations only: the contract names them, the engines import them
    from tracefleet.agent.capture.contain import ErrorCounter

# what add_sink() takes: called with each decoded event (the model's JSON shape)
EventSink = Callable[[dict[str, Any]], None]

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


class CaptureEngine(abc.ABC):
    """The contract between an engine and its callers (the controller client, the metrics
    collector, the exporters): every member they call is declared here, typed, so mypy
    checks each call and no caller probes an engine with getattr.

    The abstract methods are what every engine does. The rest have the honest answer of an
    engine without BPF programs, a ring buffer or user_events: empty mappings, "no health
    problem", ``None`` for "not applicable" (the metrics collector leaves those series
    out). An engine that has one overrides it; a wrapper (``UserEventsEngine``) overrides
    every member, else a default would hide what its inner engine has."""

    # ---- what every engine does ----------------------------------------------------------
    @abc.abstractmethod
    def capabilities(self) -> Mapping[str, Any]:
        """Probe report: kernel version, BPF features, strategy per event set with reasons."""

    @abc.abstractmethod
    def event_sets(self) -> Sequence[str]:
        """Names of the event sets this engine knows."""

    @abc.abstractmethod
    def apply(self, desired: Mapping[str, EventSetConfig]) -> Sequence[SetStatus]:
        """Make the kernel match ``desired``; sets not named are disabled. Never raises for one
        bad set: its SetStatus carries the error."""

    @abc.abstractmethod
    def collect(self) -> Aggregates:
        """Aggregates since the previous call (deltas)."""

    @abc.abstractmethod
    def totals(self) -> Mapping[str, SetAggregate]:
        """Cumulative aggregates per set since start: what collect() handed out, summed (the
        metrics endpoint reads these, so both consumers see every count once)."""

    @abc.abstractmethod
    def sample_events(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` raw events decoded since the previous call, as JSON-ready dicts with
        ts_ns, event_set, syscall, pid, tid, comm, ret and args {name: {value, status,
        strategy}}."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # ---- sinks (exporters): an engine that decodes no records has nothing to hand on ------
    def add_sink(self, sink: EventSink) -> None:
        """Hand every decoded event to ``sink`` from now on."""
        del sink  # no records decoded here: nothing to hand on

    def remove_sink(self, sink: EventSink) -> None:
        """Stop handing events to ``sink``."""
        del sink

    def stop_and_drain(self) -> int:
        """Stop reading and hand what is still buffered to the sinks; returns how many."""
        return 0

    # ---- state and health ---------------------------------------------------------------
    def statuses(self) -> Sequence[SetStatus] | None:
        """The status of every set as the engine holds it now; None: the engine keeps none
        (callers use what apply() returned)."""
        return None

    def status_updates(self) -> Sequence[SetStatus]:
        """Statuses that changed since apply() (or the last call) returned them: a set that
        attached later (a user_event registered after its rule)."""
        return []

    def user_events_report(self) -> Mapping[str, Any] | None:
        """The user_events registered on this node (``available``, ``reason``, ``total``,
        ``events`` [{name, used_by, attached}]); None: this engine has no user_events."""
        return None

    def health(self) -> tuple[bool, str]:
        """(alive, why): the consumer runs and its heartbeat is fresh."""
        return True, "engine has no consumer to watch"

    def consumer(self) -> tuple[bool, str] | None:
        """(compiled, why) of the ring buffer consumer; None: the engine has no ring."""
        return None

    # ---- counters beyond the aggregates --------------------------------------------------
    @property
    def errors(self) -> ErrorCounter | None:
        """Contained per-record failures per (set, cause); None: nothing is contained."""
        return None

    def kernel_missed(self, name: str) -> tuple[int, int] | None:
        """(entry, exit) runs of the set's programs the kernel skipped; None: ``name`` has no
        BPF programs."""
        return None

    @property
    def fallback_rejected(self) -> Mapping[tuple[str, str], int] | None:
        """User-space fallback reads refused per (set, cause); None: no fallback."""
        return None

    @property
    def namespace_events(self) -> Mapping[tuple[str, str], int]:
        """Events per (set, pod namespace), opt-in; empty when not counted."""
        return {}

    def attribution_unknown(self) -> Mapping[str, int] | None:
        """Events sent without full workload metadata, per cause; None: no attribution."""
        return None

    def exe_unknown(self) -> Mapping[str, int] | None:
        """Decoded events whose executable is not known, per cause (capture/exe.py: no-mm,
        not-in-map, truncated, lookup); None: the engine does not resolve executables."""
        return None

    # ---- BPF run-time statistics ---------------------------------------------------------
    def enable_run_stats(self) -> bool:
        """Turn the kernel's BPF run-time statistics on; False when there is nothing to time."""
        return False

    @property
    def bpf_stats_enabled(self) -> bool:
        return False

    def program_stats(self) -> Sequence[tuple[str, str, int, int]]:
        """[(event_set, program, run_time_ns, run_count)] of the loaded BPF programs."""
        return []
