"""The controller's Prometheus endpoint (--metrics-listen): every metric name, in one place.

Names are ``tracefleet_controller_<name>_<unit>`` in base units (seconds), ``_total`` on
counters. Labels come only from {node, event_set, syscall, strategy, outcome, kind, reason}:
node names are the fleet's nodes, the rest are bounded enumerations (refusal reasons:
``auth.REASONS`` and ``tls.HANDSHAKE_REASONS``). Never a pid, path, comm or pod.

Fleet-wide counts are merged exactly from the agents' ResultBatches (histograms bucket by
bucket, ``Histogram.add``) into cumulative totals per node and event set;
replayed batches (sent after an outage) are counted too, batches resent after a reconnect
that were already applied are not. Event, call and batch counts (delivered, dropped,
discarded, passed, lost, prefix-filtered, undecodable, batches) are the controller's ledger,
persisted in its database: they continue across restarts. Per-syscall, per-outcome and
latency counts live in this process only. Fleet state (connections, staleness, generations,
pending acks) is read from the Controller on every scrape (a custom collector). The
Controller calls this module through ``Controller.observers`` (on_generation, on_ack,
on_batch) on its asyncio loop; scrapes run on the HTTP server's thread, hence the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tracefleet.controller.api.auth import REASONS, refusal_kind
from tracefleet.controller.api.tls import HANDSHAKE_REASONS
from tracefleet.controller.domain.controller import Controller
from tracefleet.controller.domain.fleet import State
from tracefleet.controller.domain.limits import REFUSALS, Refusals
from tracefleet.model.histogram import Histogram, HistogramMismatch
from tracefleet.model.names import OUTCOMES
from tracefleet.model.netaddr import split_host_port

log = logging.getLogger("tracefleet.controller.metrics")

ALLOWED_LABELS = frozenset(
    {"node", "event_set", "syscall", "strategy", "outcome", "kind", "reason", "stage"}
)
REFUSAL_REASONS = (*REASONS, *(f"tls_{r}" for r in HANDSHAKE_REASONS))

# Batch arrival and enable-to-applied latencies: milliseconds (loopback) to minutes (outage).
ARRIVAL_BUCKETS_SECONDS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip
APPLY_BUCKETS_SECONDS = ARRIVAL_BUCKETS_SECONDS

# name -> (type, labels, help)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "tracefleet_controller_capture_latency_seconds": (
        "histogram",
        ("node", "event_set"),
        "Delivery latency: syscall entry to decoded in the agent, as reported by the agents "
        "(merged exactly).",
    ),
    "tracefleet_controller_arrival_latency_seconds": (
        "histogram",
        ("node",),
        "Age of a result batch when the controller receives it: end of the agent's interval "
        "(agent wall clock) to receipt; the batch's events are older by up to one interval. "
        "Replayed batches count with their real age.",
    ),
    "tracefleet_controller_arguments_total": (
        "counter",
        ("node", "event_set", "strategy", "outcome"),
        "Captured arguments reported by the agents, by capture strategy and outcome.",
    ),
    "tracefleet_controller_events_delivered_total": (
        "counter",
        ("node", "event_set"),
        "Events the agents decoded, as reported.",
    ),
    "tracefleet_controller_events_dropped_total": (
        "counter",
        ("node", "event_set"),
        "Events lost in the kernel (ring buffer full, consumer lag), as reported.",
    ),
    "tracefleet_controller_events_discarded_total": (
        "counter",
        ("node", "event_set"),
        "Events of result batches an agent discarded (its outbox exceeded its memory budget "
        "during an outage), as reported by the agent: the shortfall of the delivered counts.",
    ),
    "tracefleet_controller_calls_passed_total": (
        "counter",
        ("node", "event_set"),
        "Syscalls that passed the event set's filters, counted in the kernel at entry (syscall "
        "sets), as reported: once quiet, passed = delivered + dropped + discarded + lost + "
        "prefix-filtered + undecodable.",
    ),
    "tracefleet_controller_calls_lost_total": (
        "counter",
        ("node", "event_set", "reason"),
        "Syscalls that passed the filters but never reached the ring buffer, counted, as "
        "reported; reason: inflight_full (no in-flight slot), inflight_stale (a call whose exit "
        "never ran: its thread died), deleted (calls the agent dropped: in flight at a detach, "
        "dead threads' entries).",
    ),
    "tracefleet_controller_calls_prefix_filtered_total": (
        "counter",
        ("node", "event_set"),
        "Syscalls that passed the filters at entry and were dropped at exit by the path-prefix "
        "filter, as reported.",
    ),
    "tracefleet_controller_records_undecodable_total": (
        "counter",
        ("node", "event_set"),
        "Records an agent read from the ring buffer but could not decode (not delivered).",
    ),
    "tracefleet_controller_bpf_runs_missed_total": (
        "counter",
        ("node", "event_set", "stage"),
        "Runs of the event set's programs the kernel skipped (its per-CPU recursion guard: a "
        "BPF program was already running on that CPU), as reported; stage entry: a call the "
        "filters never saw, of any process (not in calls passed); stage exit: its in-flight "
        "entry is deleted later and counted in calls lost.",
    ),
    "tracefleet_controller_syscall_events_total": (
        "counter",
        ("node", "event_set", "syscall"),
        "Events the agents decoded, per syscall.",
    ),
    "tracefleet_controller_batches_total": (
        "counter",
        ("node",),
        "Result batches applied (each counted once).",
    ),
    "tracefleet_controller_batches_duplicate_total": (
        "counter",
        ("node",),
        "Result batches received again after a reconnect that had already been applied (ignored).",
    ),
    "tracefleet_controller_batches_adopted_total": (
        "counter",
        ("node",),
        "Resent result batches applied for an agent that came from another controller replica "
        "(its first batch here was past seq 1): batches no replica had committed (with --etcd "
        "the ledger is shared). Since this controller started.",
    ),
    "tracefleet_controller_batches_discarded_total": (
        "counter",
        ("node",),
        "Result batches an agent reported it discarded (outbox over its memory budget).",
    ),
    "tracefleet_controller_ledger_commits_total": (
        "counter",
        (),
        "Transactions writing applied result batches (and their seqs) to the database.",
    ),
    "tracefleet_controller_ledger_commit_seconds_total": (
        "counter",
        (),
        "Time spent in those transactions (the event loop waits for them).",
    ),
    "tracefleet_controller_agents_connected": (
        "gauge",
        (),
        "Agents with an open stream.",
    ),
    "tracefleet_controller_agents_disconnected": (
        "gauge",
        (),
        "Known agents whose stream closed recently (not stale yet).",
    ),
    "tracefleet_controller_agents_stale": (
        "gauge",
        (),
        "Known agents not heard from for longer than --stale-after.",
    ),
    "tracefleet_controller_agent_connected": (
        "gauge",
        ("node",),
        "1 if the node's agent has an open stream, else 0.",
    ),
    "tracefleet_controller_agent_stale": (
        "gauge",
        ("node",),
        "1 if the node was not heard from for longer than --stale-after, else 0.",
    ),
    "tracefleet_controller_agent_last_seen_timestamp_seconds": (
        "gauge",
        ("node",),
        "Unix time the controller last heard from the node.",
    ),
    "tracefleet_controller_agent_applied_generation": (
        "gauge",
        ("node",),
        "Generation the node's agent acknowledged last.",
    ),
    "tracefleet_controller_strategy_info": (
        "gauge",
        ("node", "event_set", "strategy"),
        "Capture strategy an agent reports per event set (always 1; the label carries it).",
    ),
    "tracefleet_controller_desired_generation": (
        "gauge",
        (),
        "Generation of the fleet's desired state.",
    ),
    "tracefleet_controller_pending_acks": (
        "gauge",
        (),
        "Connected agents that have not acknowledged the desired generation yet.",
    ),
    "tracefleet_controller_batch_pace_seconds": (
        "gauge",
        (),
        "Seconds each agent is asked to leave between its result batches (BatchAck.pace), so "
        "that the fleet sends at most --max-batch-rate a second; below an agent's interval, "
        "it reports every interval.",
    ),
    "tracefleet_controller_store_write_failures_total": (
        "counter",
        (),
        "Writes to the controller's store (its database, or etcd in the replicated mode) that "
        "failed: rules refused or saved later, result batches left unacknowledged and retried.",
    ),
    "tracefleet_controller_etcd_available": (
        "gauge",
        (),
        "Replicated mode: 1 while etcd serves this replica, 0 from a call no member could "
        "serve (no quorum, members unreachable) until a quorum read succeeds; changes of "
        "event sets are refused meanwhile.",
    ),
    "tracefleet_controller_refused_total": (
        "counter",
        ("kind", "reason"),
        "Clients the controller refused, by kind (agent, operator, tls) and reason: agent "
        "identity (certificate or ServiceAccount token), operator credentials and roles, TLS "
        "handshakes grpc rejected.",
    ),
    "tracefleet_controller_enable_to_applied_seconds": (
        "histogram",
        (),
        "A new generation (enable, disable, expiry) to its acknowledgement by an agent, once "
        "per agent and generation issued by this controller process.",
    ),
}


def _family(name: str) -> Any:  # add_metric's signature depends on the kind
    kind, labels, doc = METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(name, doc, labels=labels)
    return HistogramMetricFamily(name, doc, labels=labels)


@dataclass
class SetTotals:
    syscalls: dict[str, int] = field(default_factory=dict)
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)  # (strategy, outcome)
    latency: Histogram | None = None


class FleetTotals:
    """Cumulative counts per node and event set, merged from batches; a Controller observer."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.sets: dict[tuple[str, str], SetTotals] = {}
        self.arrival: dict[str, Histogram] = {}
        self.apply_latency = Histogram.empty(APPLY_BUCKETS_SECONDS)
        self._issued: dict[int, float] = {}  # generation -> unix time it was issued

    # Controller observer ---------------------------------------------------------------

    def on_generation(self, generation: int) -> None:
        with self._lock:
            self._issued.setdefault(generation, self._clock())
            for g in sorted(self._issued)[:-64]:  # keep the recent ones only
                del self._issued[g]

    def on_ack(self, node: Any, ack: Any, previous_generation: int) -> None:
        with self._lock:
            issued = self._issued.get(ack.generation)
            if issued is None or ack.generation <= previous_generation:
                return  # not issued by this process, or a re-ack after a reconnect
            self.apply_latency.observe(max(0.0, self._clock() - issued))

    def on_batch(self, node: Any, batch: Any) -> None:
        now = self._clock()
        name = node.name
        with self._lock:
            if batch.interval_end_ns:
                arrival = self.arrival.setdefault(name, Histogram.empty(ARRIVAL_BUCKETS_SECONDS))
                arrival.observe(max(0.0, now - batch.interval_end_ns / 1e9))
            for s in batch.sets:
                t = self.sets.setdefault((name, s.event_set), SetTotals())
                for sc, n in s.events_by_syscall.items():
                    t.syscalls[sc] = t.syscalls.get(sc, 0) + n
                for o in s.outcomes:
                    key = (o.strategy, o.outcome)
                    t.outcomes[key] = t.outcomes.get(key, 0) + o.count
                if s.HasField("latency") and s.latency.counts:
                    try:
                        h = Histogram(
                            tuple(s.latency.bounds), list(s.latency.counts), s.latency.sum
                        )
                        if t.latency is None:
                            t.latency = Histogram.empty(h.bounds)
                        t.latency.add(h)
                    except HistogramMismatch:
                        pass  # the controller warns about it once per node

    def on_forget(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self.sets if k[0] == name]:
                del self.sets[key]
            self.arrival.pop(name, None)

    # snapshot for the collector --------------------------------------------------------

    def snapshot(
        self,
    ) -> tuple[dict[tuple[str, str], SetTotals], dict[str, Histogram], Histogram]:
        with self._lock:
            sets = {
                k: SetTotals(
                    dict(v.syscalls),
                    dict(v.outcomes),
                    v.latency.copy() if v.latency else None,
                )
                for k, v in self.sets.items()
            }
            arrival = {n: h.copy() for n, h in self.arrival.items()}
            apply = self.apply_latency.copy()
            return sets, arrival, apply


class ControllerCollector(Collector):
    def __init__(
        self, controller: Controller, totals: FleetTotals, refusals: Refusals = REFUSALS
    ) -> None:
        self.ctl = controller
        self.totals = totals
        self.refusals = refusals

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        fams = {name: _family(name) for name in METRICS}
        sets, arrival, apply = self.totals.snapshot()
        for node, counts in sorted(self.ctl.ledger.snapshot().items()):
            for event_set, c in sorted(counts.sets.items()):
                labels = [node, event_set]
                fams["tracefleet_controller_events_delivered_total"].add_metric(labels, c.delivered)
                fams["tracefleet_controller_events_dropped_total"].add_metric(labels, c.dropped)
                fams["tracefleet_controller_events_discarded_total"].add_metric(labels, c.discarded)
                fams["tracefleet_controller_calls_passed_total"].add_metric(labels, c.passed)
                for reason, count in (("inflight_full", c.lost_inflight_full),
                                  ("inflight_stale", c.lost_inflight_stale),
                                  ("deleted", c.lost_deleted)):  # fmt: skip
                    fams["tracefleet_controller_calls_lost_total"].add_metric(
                        [*labels, reason], count
                    )
                fams["tracefleet_controller_calls_prefix_filtered_total"].add_metric(
                    labels, c.prefix_filtered
                )
                fams["tracefleet_controller_records_undecodable_total"].add_metric(
                    labels, c.decode_errors
                )
                for stage, count in (("entry", c.kernel_missed_entry),
                                     ("exit", c.kernel_missed_exit)):  # fmt: skip
                    fams["tracefleet_controller_bpf_runs_missed_total"].add_metric(
                        [*labels, stage], count
                    )
            fams["tracefleet_controller_batches_total"].add_metric([node], counts.applied)
            fams["tracefleet_controller_batches_duplicate_total"].add_metric(
                [node], counts.duplicate
            )
            fams["tracefleet_controller_batches_discarded_total"].add_metric(
                [node], counts.discarded
            )
            fams["tracefleet_controller_batches_adopted_total"].add_metric([node], counts.adopted)
        fams["tracefleet_controller_ledger_commits_total"].add_metric([], self.ctl.commits)
        fams["tracefleet_controller_ledger_commit_seconds_total"].add_metric(
            [], self.ctl.commit_seconds
        )
        for (node, event_set), t in sorted(sets.items()):
            if t.latency is not None:
                fams["tracefleet_controller_capture_latency_seconds"].add_metric(
                    [node, event_set], t.latency.cumulative_buckets(), t.latency.sum
                )
            for sc, n in sorted(t.syscalls.items()):
                fams["tracefleet_controller_syscall_events_total"].add_metric(
                    [node, event_set, sc], n
                )
            outcomes = dict(t.outcomes)
            for strategy in {s for s, _ in outcomes}:  # zeros too: ratios exist from the start
                for outcome in OUTCOMES:
                    outcomes.setdefault((strategy, outcome), 0)
            for (strategy, outcome), n in sorted(outcomes.items()):
                fams["tracefleet_controller_arguments_total"].add_metric(
                    [node, event_set, strategy, outcome], n
                )
        for node, h in sorted(arrival.items()):
            fams["tracefleet_controller_arrival_latency_seconds"].add_metric(
                [node], h.cumulative_buckets(), h.sum
            )
        fams["tracefleet_controller_enable_to_applied_seconds"].add_metric(
            [], apply.cumulative_buckets(), apply.sum
        )
        refused = dict.fromkeys(REFUSAL_REASONS, 0) | self.refusals.snapshot()
        fam = fams["tracefleet_controller_refused_total"]
        for reason, n in sorted(refused.items()):
            fam.add_metric([refusal_kind(reason), reason], n)
        self._fleet(fams)
        return [f for f in fams.values() if f.samples]

    def _fleet(self, fams: dict[str, Any]) -> None:
        ctl = self.ctl
        fleet = ctl.fleet
        now = time.time()
        generation = ctl.generation
        counts = dict.fromkeys(State, 0)
        pending = 0
        for node in sorted(list(fleet.nodes.values()), key=lambda n: n.name):
            state = fleet.state(node, now)
            counts[state] += 1
            connected = node.conn is not None
            if connected and node.applied_generation < generation:
                pending += 1
            fams["tracefleet_controller_agent_connected"].add_metric([node.name], int(connected))
            fams["tracefleet_controller_agent_stale"].add_metric(
                [node.name], int(state is State.STALE)
            )
            fams["tracefleet_controller_agent_last_seen_timestamp_seconds"].add_metric(
                [node.name], node.last_seen
            )
            fams["tracefleet_controller_agent_applied_generation"].add_metric(
                [node.name], node.applied_generation
            )
            for st in _statuses(node.info):
                if st.get("strategy") and st["strategy"] != "none":
                    fams["tracefleet_controller_strategy_info"].add_metric(
                        [node.name, str(st["name"]), str(st["strategy"])], 1
                    )
        fams["tracefleet_controller_agents_connected"].add_metric([], counts[State.CONNECTED])
        fams["tracefleet_controller_agents_disconnected"].add_metric([], counts[State.DISCONNECTED])
        fams["tracefleet_controller_agents_stale"].add_metric([], counts[State.STALE])
        fams["tracefleet_controller_desired_generation"].add_metric([], generation)
        fams["tracefleet_controller_pending_acks"].add_metric([], pending)
        fams["tracefleet_controller_batch_pace_seconds"].add_metric([], ctl.batch_pace())
        fams["tracefleet_controller_store_write_failures_total"].add_metric([], ctl.store_errors)
        if ctl.store.shared:
            fams["tracefleet_controller_etcd_available"].add_metric([], int(not ctl.store.problem))


def _statuses(info: dict[str, Any]) -> Sequence[dict[str, Any]]:
    statuses = info.get("statuses") or ()
    return [s for s in list(statuses) if isinstance(s, dict) and s.get("name")]


class MetricsServer:
    def __init__(self, controller: Controller, address: str) -> None:
        from prometheus_client import start_http_server
        from prometheus_client.process_collector import ProcessCollector

        self.totals = FleetTotals()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ControllerCollector(controller, self.totals))
        ProcessCollector(registry=self.registry)  # process_*: standard names, no prefix
        host, port = split_host_port(address)
        self._server, self._thread = start_http_server(port, host or "0.0.0.0", self.registry)
        self.port = self._server.server_port
        controller.observers.append(self.totals)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_metrics(address: str, controller: Controller) -> MetricsServer:
    """Serve /metrics on ``address`` (host:port) for ``controller`` from a daemon thread.
    Exits the process with a clear message if the address cannot be served."""
    try:
        server = MetricsServer(controller, address)
    except (ValueError, OSError) as e:
        raise SystemExit(f"tracefleet-controller: cannot serve metrics on {address}: {e}") from e
    log.info("metrics on http://%s/metrics", address)
    return server
