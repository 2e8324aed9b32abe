"""`tracefleet-agent run --otlp-metrics`: a real agent (real BPF) pushes its aggregates to an
OTLP metrics receiver built on the official opentelemetry-proto service (gRPC, in this
process); a workload's exact call count arrives under the Prometheus metric's name and
labels, and the last export at SIGTERM carries the final counts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

from tests.conftest import BPF_DIR, require_root, wait_until
from tests.e2e.security_helpers import start_controller, tf
from tests.e2e.test_export_rules import COMM, WORKLOAD, N, groups, sockdir  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.bpf]
AGENT = [sys.executable, "-m", "tracefleet.agent"]
SLOW = 10 if os.environ.get("TRACEFLEET_IN_VM") else 1


class Receiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.openat: list[float] = []  # per export: file/openat events of node om-1

    def Export(self, request: Any, context: Any) -> Any:
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != "tracefleet_agent_syscall_events_total":
                        continue
                    for p in m.sum.data_points:
                        lbl = {a.key: a.value.string_value for a in p.attributes}
                        if lbl == {"node": "om-1", "event_set": "file", "syscall": "openat"}:
                            with self.lock:
                                self.openat.append(p.as_int or p.as_double)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def last(self) -> float:
        with self.lock:
            return self.openat[-1] if self.openat else -1


def test_run_pushes_exact_counts_over_otlp_metrics(sockdir, groups):  # noqa: F811
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.skip("run `make bpf` first")
    rx = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(rx, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    d = sockdir
    log = d / "agent.log"
    ctl = start_controller(d, groups)
    with open(log, "ab") as f:
        agent = subprocess.Popen(
            [*AGENT, "run", "--controller", f"unix:{d}/ctl.sock", "--node", "om-1",
             "--metrics-listen", "off", "--state-file", "off",
             "--otlp-metrics", f"grpc:127.0.0.1:{port}", "--otlp-metrics-interval", "0.5"],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "registered with the controller" in log.read_text(),
                   180 * SLOW, "the agent to register")  # fmt: skip
        r = tf(d, "enable", "file", "--comm", COMM, "--wait")
        assert r.returncode == 0, r.stdout + r.stderr
        subprocess.run([sys.executable, "-c", WORKLOAD, str(d / "missing")], check=True,
                       timeout=120 * SLOW)  # fmt: skip
        wait_until(lambda: rx.last() >= N, 120 * SLOW, f"{N} openat events over OTLP metrics")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=120 * SLOW) == 0, log.read_text()[-2000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        ctl.terminate()
        ctl.wait(timeout=60)
        server.stop(0)
    # the comm filter keeps the count to the workload's own calls: exact, also at exit
    assert rx.last() == N, (rx.openat[-5:], log.read_text()[-2000:])
    assert rx.openat == sorted(rx.openat)  # cumulative
