"""The controller process itself: health checking, reflection, the insecure-listen warning,
and clean shutdown."""

import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.e2e.fleet_helpers import PY, ControllerProc, wait_until

pytestmark = pytest.mark.e2e


def test_health_and_reflection(tmp_path):
    ctl = ControllerProc(tmp_path).start()
    try:
        with grpc.insecure_channel(ctl.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "tracefleet.v1.ControlService", "tracefleet.v1.AgentService"):
                resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            (answer,) = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = {s.name for s in answer.list_services_response.service}
            assert {"tracefleet.v1.AgentService", "tracefleet.v1.ControlService"} <= names
            assert "grpc.health.v1.Health" in names
    finally:
        assert ctl.stop(signal.SIGTERM) == 0  # graceful shutdown exits 0


def test_loud_warning_when_listening_insecurely_beyond_loopback(tmp_path):
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "tracefleet.controller.server",
            "--listen",
            "0.0.0.0:0",
            "--db",
            ":memory:",
            "--insecure",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        wait_until(lambda: lines.append(proc.stderr.readline()) or "listening on" in lines[-1])
        text = "".join(lines)
        assert "WITHOUT TLS OR AUTHENTICATION" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_bad_arguments_exit_2(tmp_path):
    r = subprocess.run(
        [PY, "-m", "tracefleet.controller.server", "--listen", "nonsense", "--db", ":memory:"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "host:port" in r.stderr
    blocker = tmp_path / "f"
    blocker.write_text("")
    r = subprocess.run(
        [
            PY,
            "-m",
            "tracefleet.controller.server",
            "--listen",
            "127.0.0.1:0",
            "--insecure-listen",
            "--db",
            str(blocker / "x.db"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--db" in r.stderr
