"""The agent's Prometheus metrics: every metric name and label of the agent, in one place.

Names are ``tracefleet_agent_<name>_<unit>`` in base units (seconds), ``_total`` on counters.
Labels come only from {node, event_set, syscall, strategy, outcome, program, cause}: every one
is a bounded set (``program`` is a BPF program name of tracefleet's own objects, e.g.
``tps_enter_openat`` or ``tp_exit_openat``: a handful per event set and strategy; ``cause`` one
of contain.CAUSES or fallback.CALLER_CAUSES). Never a
pid, path, comm, pod or anything else taken from traced processes.

Everything is read from the engine when Prometheus scrapes (a custom collector): the engine
keeps cumulative totals next to the deltas that ``collect()`` hands to the controller client,
so both consumers see every count and nothing is counted twice. Kernel counters (drops,
argument outcomes) are read straight from the kernel's map at scrape time.

The per-program run time and run count come from the kernel's BPF statistics, which the agent
turns on (``BPF_ENABLE_STATS``) while it serves metrics. Cost: two clock reads per run of
every BPF program on the host (``bpf_stats_enabled`` is system-wide), about 20-40 ns each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tracefleet.agent.capture.contain import CAUSES
from tracefleet.agent.capture.engine import CaptureEngine, SetStatus
from tracefleet.agent.capture.exe import CAUSES as EXE_UNKNOWN_CAUSES
from tracefleet.agent.capture.fallback import CALLER_CAUSES
from tracefleet.agent.control.redact import ERRORS as REDACT_ERRORS
from tracefleet.model.names import OUTCOMES
from tracefleet.model.netaddr import split_host_port

log = logging.getLogger("tracefleet.agent.metrics")

# bounded label sets only; "namespace" is opt-in with a cardinality budget (never pod
# names or UIDs: a label per pod would grow without bound)
ALLOWED_LABELS = frozenset(
    {
        "node",
        "event_set",
        "syscall",
        "strategy",
        "outcome",
        "program",
        "cause",
        "exporter",
        "consumer",
        "namespace",
        "stage",  # entry, exit
    }
)
DEFAULT_RUN_LISTEN = "0.0.0.0:9091"

# name -> (type, labels, help). Counters are named with their _total suffix here; the
# exposition adds it, so the registered family name is the name without it.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "tracefleet_agent_capture_latency_seconds": (
        "histogram",
        ("node", "event_set"),
        "Delivery latency: syscall entry (kernel timestamp) to the event decoded in the agent.",
    ),
    "tracefleet_agent_arguments_total": (
        "counter",
        ("node", "event_set", "strategy", "outcome"),
        "Captured syscall arguments by outcome (ok, recovered, lost, truncated) and the "
        "capture strategy that produced it (kernel counters; user-fallback recoveries are "
        "moved from lost to recovered).",
    ),
    "tracefleet_agent_events_delivered_total": (
        "counter",
        ("node", "event_set"),
        "Events decoded by the agent.",
    ),
    "tracefleet_agent_events_dropped_total": (
        "counter",
        ("node", "event_set"),
        "Events lost in the kernel (ring buffer full or consumer lag), from kernel counters.",
    ),
    "tracefleet_agent_calls_passed_total": (
        "counter",
        ("node", "event_set"),
        "Syscalls that passed the event set's filters, counted in the kernel at entry: each is "
        "delivered, dropped, counted lost, filtered by path prefix, or still in flight.",
    ),
    "tracefleet_agent_calls_lost_total": (
        "counter",
        ("node", "event_set"),
        "Syscalls that passed the filters but never reached the ring buffer, counted: "
        "no in-flight slot, a call whose exit never ran (its thread died), calls the agent "
        "dropped (in flight at a detach, dead threads' entries).",
    ),
    "tracefleet_agent_bpf_runs_missed_total": (
        "counter",
        ("node", "event_set", "stage"),
        "Runs of the set's programs the kernel skipped (its per-CPU guard saw another BPF "
        "program running; recursion_misses), stage entry or exit: a skipped entry is a call "
        "the filters never saw, of any process (not in calls passed); a skipped exit leaves an "
        "entry counted lost once its thread is gone.",
    ),
    "tracefleet_agent_syscall_events_total": (
        "counter",
        ("node", "event_set", "syscall"),
        "Events decoded by the agent per syscall.",
    ),
    "tracefleet_agent_record_errors_total": (
        "counter",
        ("node", "event_set", "cause"),
        "Failures contained while handling one record, per cause (decode: the record was "
        "unusable and not delivered; fallback, filter, sample, sink, redact: one step failed "
        "and the rest of the record went on; housekeeping, poll: consumer steps, retried). Events "
        "produced = delivered + dropped + record errors with cause decode.",
    ),
    "tracefleet_agent_exe_unknown_total": (
        "counter",
        ("node", "cause"),
        "Decoded events whose executable path is not known, per cause (no-mm: a kernel "
        "thread; not-in-map: the kernel could not walk it, or evicted it first; truncated: "
        "longer than 255 bytes; lookup: the map lookup failed).",
    ),
    "tracefleet_agent_attribution_unknown_total": (
        "counter",
        ("node", "cause"),
        "Events sent without full workload metadata, per cause (cgroup: the cgroup was not "
        "resolved yet; pod: the pod of a container is not known yet; container-name).",
    ),
    "tracefleet_agent_namespace_events_total": (
        "counter",
        ("node", "event_set", "namespace"),
        "Events per pod namespace, opt-in (--metrics-namespaces N): at most N namespace "
        'values, the rest as _other; "" outside pods. Never pod names or UIDs.',
    ),
    "tracefleet_agent_fallback_rejected_total": (
        "counter",
        ("node", "event_set", "cause"),
        "User-space fallback reads refused or discarded because the record's tid could not be "
        "tied to the task that made the call (pid-reused, caller-exited, caller-unpinnable): "
        "the arguments stay lost.",
    ),
    "tracefleet_agent_export_events_total": (
        "counter",
        ("node", "exporter"),
        "Events an exporter wrote (events later deleted by its file rotation excluded).",
    ),
    "tracefleet_agent_export_undeliverable_total": (
        "counter",
        ("node", "exporter", "cause"),
        "Events an exporter received and did not deliver, per cause (queue_full: its writer "
        "fell behind; write: the destination refused; serialize; rotated_out: written, then "
        "deleted with the oldest rotated file; shutdown: still queued when the agent stopped and "
        "the writer had not finished in time). Received = exported + undeliverable + queued.",
    ),
    "tracefleet_agent_export_healthy": (
        "gauge",
        ("node", "exporter"),
        "1 while the exporter's writer thread runs, 0 once it has died or stopped (its queue "
        "then only fills: every event it is offered becomes undeliverable).",
    ),
    "tracefleet_agent_consumer_healthy": (
        "gauge",
        ("node",),
        "1 while the ring buffer consumer runs with a fresh heartbeat (the /healthz check), "
        "else 0: events stay in the ring and are dropped once it is full.",
    ),
    "tracefleet_agent_bpf_program_run_time_seconds_total": (
        "counter",
        ("node", "event_set", "program"),
        "Run time of each BPF program, as accounted by the kernel (bpf_stats, turned on "
        "while the agent serves metrics; it adds two clock reads per program run).",
    ),
    "tracefleet_agent_bpf_program_runs_total": (
        "counter",
        ("node", "event_set", "program"),
        "Runs of each BPF program, as counted by the kernel (bpf_stats; see run_time).",
    ),
    "tracefleet_agent_bpf_stats_enabled": (
        "gauge",
        ("node",),
        "1 if the agent holds the kernel's BPF run-time statistics on (bpf_stats).",
    ),
    "tracefleet_agent_strategy_info": (
        "gauge",
        ("node", "event_set", "strategy"),
        "Capture strategy in use per event set (always 1; the strategy is the label).",
    ),
    "tracefleet_agent_ring_consumer_info": (
        "gauge",
        ("node", "consumer"),
        "Ring buffer consumer in use: compiled (fastring) or python (always 1; why: probe).",
    ),
    "tracefleet_agent_event_set_enabled": (
        "gauge",
        ("node", "event_set"),
        "1 if the event set is enabled (attached and its enable bit set), else 0.",
    ),
    "tracefleet_agent_applied_generation": (
        "gauge",
        ("node",),
        "Generation of the controller's desired state the agent applied last.",
    ),
    "tracefleet_agent_controller_connected": (
        "gauge",
        ("node",),
        "1 while the agent's stream to the controller is registered, else 0.",
    ),
    "tracefleet_agent_controller_connects_total": (
        "counter",
        ("node",),
        "Streams to the controller that registered (reconnects included).",
    ),
    "tracefleet_agent_controller_failovers_total": (
        "counter",
        ("node",),
        "Moves to the next controller address after a failed, broken or unanswered stream "
        "(run --controller with several replicas).",
    ),
    "tracefleet_agent_outbox_batches": (
        "gauge",
        ("node",),
        "Result batches kept until the controller acknowledges them (grows during an outage).",
    ),
    "tracefleet_agent_outbox_bytes": (
        "gauge",
        ("node",),
        "Serialized size of the result batches kept in the outbox.",
    ),
    "tracefleet_agent_outbox_discarded_batches_total": (
        "counter",
        ("node",),
        "Result batches discarded, never sent, because the outbox exceeded its memory budget.",
    ),
    "tracefleet_agent_outbox_discarded_events_total": (
        "counter",
        ("node",),
        "Events (delivered + dropped) of the discarded result batches; the controller is told "
        "their number and counts them as discarded.",
    ),
}


# ---- collector ----------------------------------------------------------------------------


def _family(name: str) -> Any:  # add_metric's signature depends on the kind
    kind, labels, doc = METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(name, doc, labels=labels)
    return HistogramMetricFamily(name, doc, labels=labels)


class AgentCollector(Collector):
    """Reads the engine (and the controller client, if any) on every scrape.

    The engine through ``CaptureEngine`` only: a member whose value is None (not applicable
    to that engine: no BPF programs, no fallback, no attribution) leaves its series out. The
    controller client is read for applied_generation, connected, stats (connects,
    batches_discarded, events_discarded), outbox_state() and statuses."""

    def __init__(
        self, engine: CaptureEngine, node: str, client: Any = None, hub: Any = None
    ) -> None:
        self.engine = engine
        self.node = node
        self.client = client
        self.hub = hub  # export.ExportHub, if exporters are configured

    def describe(self) -> Iterable[Metric]:
        return []  # not probed at registration: collect() reads the kernel

    def collect(self) -> Iterable[Metric]:
        fams = {name: _family(name) for name in METRICS}
        node = self.node
        engine = self.engine
        totals = engine.totals()
        for name, sa in sorted(totals.items()):
            fams["tracefleet_agent_capture_latency_seconds"].add_metric(
                [node, name], sa.latency.cumulative_buckets(), sa.latency.sum
            )
            fams["tracefleet_agent_events_delivered_total"].add_metric([node, name], sa.delivered)
            fams["tracefleet_agent_events_dropped_total"].add_metric([node, name], sa.dropped)
            fams["tracefleet_agent_calls_passed_total"].add_metric([node, name], sa.passed)
            fams["tracefleet_agent_calls_lost_total"].add_metric([node, name], sa.lost)
            for sc, n in sorted(sa.events_by_syscall.items()):
                fams["tracefleet_agent_syscall_events_total"].add_metric([node, name, sc], n)
            missed = engine.kernel_missed(name)  # None: no BPF programs (user_events)
            if missed is not None:
                for stage, n in zip(("entry", "exit"), missed, strict=True):
                    fams["tracefleet_agent_bpf_runs_missed_total"].add_metric(
                        [node, name, stage], n
                    )
            for (strategy, outcome), n in sorted(with_all_outcomes(sa.outcomes).items()):
                fams["tracefleet_agent_arguments_total"].add_metric(
                    [node, name, strategy, outcome], n
                )
        errors = engine.errors
        if errors is not None:
            counts = errors.snapshot()
            for key, n in REDACT_ERRORS.snapshot().items():  # the controller client's
                counts[key] = counts.get(key, 0) + n
            # every cause of every set present, zeros included (rates exist from the start)
            for es in sorted({s for s, _ in counts} | set(totals)):
                for cause in CAUSES:
                    fams["tracefleet_agent_record_errors_total"].add_metric(
                        [node, es, cause], counts.get((es, cause), 0)
                    )
        exe_unknown = engine.exe_unknown()
        if exe_unknown is not None:
            for cause in EXE_UNKNOWN_CAUSES:
                fams["tracefleet_agent_exe_unknown_total"].add_metric(
                    [node, cause], exe_unknown.get(cause, 0)
                )
        unknown = engine.attribution_unknown()
        if unknown is not None:
            for cause in ("cgroup", "pod", "container-name"):
                fams["tracefleet_agent_attribution_unknown_total"].add_metric(
                    [node, cause], unknown.get(cause, 0)
                )
        for (es, ns), n in sorted(dict(engine.namespace_events).items()):
            fams["tracefleet_agent_namespace_events_total"].add_metric([node, es, ns], n)
        rejected = engine.fallback_rejected
        if rejected is not None:
            rej = dict(rejected)
            for es in sorted({s for s, _ in rej} | set(totals)):
                for cause in CALLER_CAUSES:
                    fams["tracefleet_agent_fallback_rejected_total"].add_metric(
                        [node, es, cause], rej.get((es, cause), 0)
                    )
        for event_set, program, run_ns, runs in engine.program_stats():
            labels = [node, event_set, program]
            fams["tracefleet_agent_bpf_program_run_time_seconds_total"].add_metric(
                labels, run_ns / 1e9
            )
            fams["tracefleet_agent_bpf_program_runs_total"].add_metric(labels, runs)
        fams["tracefleet_agent_bpf_stats_enabled"].add_metric(
            [node], 1.0 if engine.bpf_stats_enabled else 0.0
        )
        kind = engine.consumer()  # None: no ring buffer, no consumer series
        if kind is not None:
            fams["tracefleet_agent_ring_consumer_info"].add_metric(
                [node, "compiled" if kind[0] else "python"], 1
            )
        for st in self._statuses():
            if st.strategy and st.strategy != "none":
                fams["tracefleet_agent_strategy_info"].add_metric([node, st.name, st.strategy], 1)
            fams["tracefleet_agent_event_set_enabled"].add_metric(
                [node, st.name], 1.0 if st.enabled and st.attached else 0.0
            )
        try:
            alive = bool(engine.health()[0])
        except Exception:
            alive = False
        fams["tracefleet_agent_consumer_healthy"].add_metric([node], 1.0 if alive else 0.0)
        for name, exp in sorted(self.hub.exporters.items() if self.hub is not None else ()):
            fams["tracefleet_agent_export_healthy"].add_metric(
                [node, name], 1.0 if exp.healthy() else 0.0
            )
            snap = exp.snapshot()
            fams["tracefleet_agent_export_events_total"].add_metric([node, name], snap["written"])
            for cause, n in snap["undeliverable"].items():
                fams["tracefleet_agent_export_undeliverable_total"].add_metric(
                    [node, name, cause], n
                )
        client = self.client
        if client is not None:
            fams["tracefleet_agent_applied_generation"].add_metric(
                [node], client.applied_generation
            )
            fams["tracefleet_agent_controller_connected"].add_metric(
                [node], 1.0 if client.connected else 0.0
            )
            fams["tracefleet_agent_controller_connects_total"].add_metric(
                [node], client.stats.connects
            )
            fams["tracefleet_agent_controller_failovers_total"].add_metric(
                [node], client.stats.failovers
            )
            batches, size = client.outbox_state()
            fams["tracefleet_agent_outbox_batches"].add_metric([node], batches)
            fams["tracefleet_agent_outbox_bytes"].add_metric([node], size)
            fams["tracefleet_agent_outbox_discarded_batches_total"].add_metric(
                [node], client.stats.batches_discarded
            )
            fams["tracefleet_agent_outbox_discarded_events_total"].add_metric(
                [node], client.stats.events_discarded
            )
        return [f for f in fams.values() if f.samples]

    def _statuses(self) -> Sequence[SetStatus]:
        held = self.engine.statuses()
        if held is not None:
            return list(held)
        if self.client is not None:
            return list(self.client.statuses or ())
        return []


def with_all_outcomes(outcomes: Mapping[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """Every outcome of every strategy present, zeros included, so ratios over outcomes
    exist from the first scrape (an absent series would make a rate query empty)."""
    out = dict(outcomes)
    for strategy in {s for s, _ in outcomes}:
        for outcome in OUTCOMES:
            out.setdefault((strategy, outcome), 0)
    return out


# ---- endpoint -----------------------------------------------------------------------------


class MetricsError(RuntimeError):
    pass


def split_listen(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces) -> (host, port)."""
    try:
        host, port = split_host_port(address)
    except ValueError:
        raise MetricsError(
            f"bad metrics address {address!r}: use host:port, e.g. 0.0.0.0:9091"
        ) from None
    return host or "0.0.0.0", port


class MetricsServer:
    """/metrics of one agent, served from a daemon thread until close(); also the probes:
    ``/healthz`` (liveness: the engine's ring buffer consumer runs and its heartbeat is
    fresh) and ``/readyz`` (that, and the controller stream registered when there is a
    controller). Each answers 200 or 503 with the reason in the body."""

    def __init__(self, collector: AgentCollector, address: str) -> None:
        from prometheus_client import start_http_server
        from prometheus_client.process_collector import ProcessCollector

        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        # process_* (CPU, memory, fds of the agent itself): the standard names, exempt from
        # the tracefleet_agent_ prefix.
        ProcessCollector(registry=self.registry)
        host, port = split_listen(address)
        try:
            self._server, self._thread = start_http_server(port, host, self.registry)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {address}: {e.strerror or e}") from e
        self.port = self._server.server_port
        metrics_app = self._server.get_app()
        if metrics_app is None:  # prometheus_client sets it in start_http_server
            raise MetricsError("the metrics HTTP server came up without its application")

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path not in ("/healthz", "/readyz"):
                return metrics_app(environ, start_response)
            ok, why = self.health() if path == "/healthz" else self.ready()
            body = f"{'ok' if ok else 'unhealthy'}: {why}\n".encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])  # fmt: skip
            return [body]

        self._server.set_app(app)

    def health(self) -> tuple[bool, str]:
        try:
            ok, why = self.collector.engine.health()
        except Exception as e:
            return False, f"health check failed: {type(e).__name__}: {e}"
        return bool(ok), str(why)

    def ready(self) -> tuple[bool, str]:
        ok, why = self.health()
        client = self.collector.client
        if ok and client is not None and not client.connected:
            return False, "not registered with the controller (yet)"
        return ok, why

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(
    engine: CaptureEngine,
    node: str,
    address: str,
    client: Any = None,
    *,
    bpf_stats: bool = True,
    hub: Any = None,
) -> MetricsServer:
    """Start /metrics on ``address`` for ``engine``; turn the kernel's BPF stats on."""
    if bpf_stats:
        engine.enable_run_stats()
    return MetricsServer(AgentCollector(engine, node, client, hub), address)
