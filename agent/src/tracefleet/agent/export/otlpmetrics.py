"""The agent's aggregates over OTLP metrics, for users without Prometheus.

Every ``interval`` the agent's Prometheus collector (``metrics.AgentCollector``: the
same reading of the engine, the controller client and the exporters that ``/metrics`` serves)
is converted into the OpenTelemetry SDK's metric data model and sent with the SDK's
``OTLPMetricExporter`` (gRPC or HTTP/protobuf). Names and labels are the Prometheus ones
(``tracefleet_agent_events_dropped_total{node, event_set}``), so dashboards and rules carry
over: counters are cumulative monotonic sums, gauges gauges, the latency histograms
histograms with the same bounds. A failed export is counted (``failures``) and the next one
carries the cumulative values again: nothing is queued, nothing blocks capture.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from tracefleet.agent.export.base import ExportConfigError

log = logging.getLogger("tracefleet.agent.otlpmetrics")


def parse_endpoint(text: str) -> tuple[str, str]:
    """``grpc:HOST:PORT`` or ``http://HOST:PORT/v1/metrics`` -> (protocol, endpoint)."""
    if text.startswith(("http://", "https://")):
        return "http", text
    rest = text.removeprefix("grpc:")
    if rest != text and rest.count(":") == 1 and rest.rsplit(":", 1)[1].isdigit():
        return "grpc", rest
    raise ExportConfigError(
        f"bad OTLP metrics endpoint {text[:80]!r}: use grpc:HOST:PORT or "
        "http://HOST:PORT/v1/metrics (--otlp-metrics)"
    )


def to_metrics_data(families: Any, node: str, start_ns: int, now_ns: int) -> Any:
    """Prometheus metric families (prometheus_client Metric objects) -> SDK MetricsData."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    cumulative = AggregationTemporality.CUMULATIVE
    metrics = []
    for fam in families:
        if fam.type == "counter":
            points = [
                NumberDataPoint(dict(s.labels), start_ns, now_ns, s.value)
                for s in fam.samples
                if s.name.endswith("_total")
            ]
            data: Any = Sum(points, cumulative, is_monotonic=True)
            name = fam.name + "_total"
        elif fam.type == "histogram":
            by: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
            for s in fam.samples:
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                h = by.setdefault(tuple(sorted(labels.items())), {"b": [], "sum": 0.0})
                if s.name.endswith("_bucket"):
                    h["b"].append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_sum"):
                    h["sum"] = s.value
            points_h = []
            for key, h in by.items():
                buckets = sorted(h["b"])
                cum = [int(v) for _, v in buckets]
                counts = [c - p for c, p in zip(cum, [0, *cum[:-1]], strict=True)]
                bounds = [b for b, _ in buckets if b != float("inf")]
                points_h.append(HistogramDataPoint(
                    dict(key), start_ns, now_ns, cum[-1] if cum else 0, h["sum"], counts,
                    bounds, min=float("nan"), max=float("nan"),
                ))  # fmt: skip
            data = Histogram(points_h, cumulative)
            name = fam.name
        elif fam.type in ("gauge", "info", "unknown"):
            points = [NumberDataPoint(dict(s.labels), start_ns, now_ns, s.value)
                      for s in fam.samples]  # fmt: skip
            data = Gauge(points)
            name = fam.name + ("_info" if fam.type == "info" else "")
        else:
            continue
        if getattr(data, "data_points", None):
            unit = "s" if name.endswith(("_seconds", "_seconds_total")) else "1"
            metrics.append(Metric(name, fam.documentation, unit, data))
    resource = Resource.create({"service.name": "tracefleet-agent", "host.name": node,
                                "k8s.node.name": node})  # fmt: skip
    scope = ScopeMetrics(InstrumentationScope("tracefleet.agent"), metrics, "")
    return MetricsData([ResourceMetrics(resource, [scope], "")])


class OtlpMetricsExporter:
    """Sends the collector's metrics every ``interval`` seconds from its own thread."""

    def __init__(self, collector: Any, endpoint: str, protocol: str = "grpc", *,
                 interval: float = 10.0, timeout: float = 10.0) -> None:  # fmt: skip
        if protocol not in ("grpc", "http"):
            raise ExportConfigError(f"OTLP metrics protocol {protocol!r}: use grpc or http")
        self.collector = collector
        self.endpoint, self.protocol = endpoint, protocol
        self.interval, self.timeout = interval, timeout
        self.exports = 0  # successful exports
        self.failures = 0  # exports the SDK gave up on (after its retries)
        self.last_error = ""
        self._start_ns = time.time_ns()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sdk: Any = None

    def start(self) -> None:
        if self.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            self._sdk = OTLPMetricExporter(endpoint=self.endpoint, insecure=True,
                                           timeout=self.timeout)  # fmt: skip
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetricExporter,
            )

            self._sdk = HttpMetricExporter(endpoint=self.endpoint, timeout=self.timeout)
        self._thread = threading.Thread(target=self._run, name="tf-otlp-metrics", daemon=True)
        self._thread.start()

    def export_once(self) -> bool:
        from opentelemetry.sdk.metrics.export import MetricExportResult

        try:
            data = to_metrics_data(self.collector.collect(), self.collector.node,
                                   self._start_ns, time.time_ns())  # fmt: skip
            result = self._sdk.export(data, timeout_millis=self.timeout * 1000)
            ok = bool(result == MetricExportResult.SUCCESS)
            err = "" if ok else f"OTLP metrics export to {self.endpoint} failed after retries"
        except Exception as e:  # a scrape or conversion failure must not end the thread
            ok, err = False, f"{type(e).__name__}: {e}"
        if ok:
            self.exports += 1
        else:
            self.failures += 1
            if self.failures & (self.failures - 1) == 0:  # 1st, 2nd, 4th...: no log flood
                log.warning("%s (%d failures so far)", err, self.failures)
            self.last_error = err
        return ok

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.export_once()

    def close(self) -> None:
        """A last export (the final counts), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout * 3)
            self.export_once()
        if self._sdk is not None:
            self._sdk.shutdown()
