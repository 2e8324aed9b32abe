"""The agent's aggregates over OTLP metrics (issue 19): the same names, labels and values as
its Prometheus /metrics, received by an OTLP metrics receiver built on the official
opentelemetry-proto service (gRPC, in this process). No root: a fixed engine."""

from __future__ import annotations

import math
import threading
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

from tests.loadgen import SyntheticEngine
from tracefleet.agent.capture.engine import SetAggregate
from tracefleet.agent.export import ExportConfigError
from tracefleet.agent.export.otlpmetrics import OtlpMetricsExporter, parse_endpoint
from tracefleet.agent.metrics import AgentCollector


class Receiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.got = threading.Event()

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        self.got.set()
        return metrics_service_pb2.ExportMetricsServiceResponse()


class FixedEngine(SyntheticEngine):
    """Cumulative totals that do not move: the scrape and the export must agree exactly."""

    def __init__(self) -> None:
        super().__init__(0)
        sa = SetAggregate(delivered=7, dropped=3, passed=12, lost=2)
        sa.events_by_syscall = {"openat": 5, "openat2": 2}
        for v in (3e-6, 3e-6, 0.02, 7.0):
            sa.latency.observe(v)
        self.sa = sa

    def totals(self) -> dict[str, SetAggregate]:
        return {"file": self.sa}

    def health(self) -> tuple[bool, str]:
        return False, "stalled (test)"


def _points(req: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rm in req.resource_metrics:
        res = {a.key: a.value.string_value for a in rm.resource.attributes}
        assert res["host.name"] == "n1" and res["service.name"] == "tracefleet-agent"
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = m
    return out


def _labels(dp: Any) -> dict[str, str]:
    return {a.key: a.value.string_value for a in dp.attributes}


def test_otlp_metrics_carry_the_prometheus_names_labels_and_values() -> None:
    rx = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(rx, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    eng = FixedEngine()
    exp = OtlpMetricsExporter(AgentCollector(eng, "n1"), f"127.0.0.1:{port}", "grpc",
                              interval=3600, timeout=30)  # fmt: skip
    try:
        exp.start()
        assert exp.export_once(), exp.last_error
    finally:
        exp.close()
        server.stop(0)
    assert exp.failures == 0 and exp.exports == 2  # export_once, and the last one at close
    m = _points(rx.requests[0])
    delivered = m["tracefleet_agent_events_delivered_total"]
    assert delivered.sum.is_monotonic
    assert [(_labels(p), p.as_int or p.as_double) for p in delivered.sum.data_points] == [
        ({"node": "n1", "event_set": "file"}, 7)
    ]
    (dropped,) = m["tracefleet_agent_events_dropped_total"].sum.data_points
    assert (dropped.as_int or dropped.as_double) == 3
    by_sc = {_labels(p)["syscall"]: p.as_int or p.as_double
             for p in m["tracefleet_agent_syscall_events_total"].sum.data_points}  # fmt: skip
    assert by_sc == {"openat": 5, "openat2": 2}
    (hist,) = m["tracefleet_agent_capture_latency_seconds"].histogram.data_points
    assert hist.count == 4 and math.isclose(hist.sum, 3e-6 + 3e-6 + 0.02 + 7.0)
    assert list(hist.explicit_bounds) == list(eng.sa.latency.bounds)
    assert list(hist.bucket_counts) == eng.sa.latency.counts
    (healthy,) = m["tracefleet_agent_consumer_healthy"].gauge.data_points
    assert (healthy.as_int or healthy.as_double) == 0


def test_otlp_metrics_to_nobody_counts_failures_and_never_raises() -> None:
    exp = OtlpMetricsExporter(AgentCollector(FixedEngine(), "n1"), "127.0.0.1:9", "grpc",
                              interval=3600, timeout=1)  # fmt: skip
    exp.start()
    try:
        assert exp.export_once() is False
    finally:
        exp.close()
    assert exp.failures >= 1 and exp.exports == 0 and "failed" in exp.last_error


@pytest.mark.parametrize("bad", ["", "grpc:host", "collector:4317", "grpc:h:p", "ftp://x"])
def test_bad_endpoint_names_the_fix(bad: str) -> None:
    with pytest.raises(ExportConfigError, match=r"use grpc:HOST:PORT or http://"):
        parse_endpoint(bad)
