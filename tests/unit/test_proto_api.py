"""The tracefleet.v1 API: generated code is current, lint-clean, and has the agreed shape."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracefleet.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2

REPO = Path(__file__).resolve().parents[2]
BUF = REPO / "build" / "tools" / "node_modules" / ".bin" / "buf"


def test_package_is_the_import_path():
    for mod in (agent_pb2, control_pb2, types_pb2):
        assert mod.DESCRIPTOR.package == "tracefleet.v1"
        assert mod.DESCRIPTOR.name == f"tracefleet/v1/{mod.__name__.split('.')[-1][:-4]}.proto"


def test_agent_service_is_one_bidi_stream():
    (method,) = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods
    assert method.name == "Connect"
    assert method.client_streaming and method.server_streaming
    assert method.input_type.full_name == "tracefleet.v1.AgentMessage"
    assert method.output_type.full_name == "tracefleet.v1.ControllerMessage"
    assert [f.name for f in agent_pb2.AgentMessage.DESCRIPTOR.oneofs_by_name["kind"].fields] == [
        "register",
        "ack",
        "result_batch",
        "node_report",
    ]
    assert hasattr(agent_pb2_grpc, "AgentServiceStub")


def test_control_service_methods():
    svc = control_pb2.DESCRIPTOR.services_by_name["ControlService"]
    shapes = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert shapes == {
        "ConfigureEventSet": (False, False),
        "GetStatus": (False, False),
        "StreamEvents": (False, True),
        "GetTop": (False, False),
        "RemoveNode": (False, False),
        "WatchAcks": (False, True),
    }
    assert hasattr(control_pb2_grpc, "ControlServiceStub")


def test_messages_round_trip():
    msg = agent_pb2.AgentMessage(
        result_batch=agent_pb2.ResultBatch(
            sets=[
                types_pb2.SetAggregate(
                    event_set="file",
                    events_by_syscall={"openat": 3},
                    outcomes=[types_pb2.OutcomeCount(strategy="s", outcome="ok", count=3)],
                    latency=types_pb2.Histogram(bounds=[1.0], counts=[2, 1], sum=4.5),
                )
            ]
        )
    )
    back = agent_pb2.AgentMessage.FromString(msg.SerializeToString())
    assert back == msg and back.WhichOneof("kind") == "result_batch"


def test_py_typed_is_shipped():
    assert (REPO / "proto" / "python" / "tracefleet" / "v1" / "py.typed").exists()


def test_generated_code_is_current():
    if not shutil.which("bash"):
        pytest.skip("bash needed")
    r = subprocess.run(
        [str(REPO / "proto" / "generate.sh"), "--check"],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stderr


def test_buf_lint_standard():
    if not BUF.exists():
        pytest.skip("buf not installed: run deploy/host/install-deps.sh")
    r = subprocess.run(
        [str(BUF), "lint"], cwd=REPO / "proto", capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_generate_check_reports_drift(tmp_path):
    copy = tmp_path / "proto"
    shutil.copytree(REPO / "proto", copy, ignore=shutil.ignore_patterns("__pycache__"))
    gen = copy / "python" / "tracefleet" / "v1" / "types_pb2.py"
    gen.write_text(gen.read_text() + "# edited by hand\n")
    (copy / "python" / "tracefleet" / "v1" / "old_pb2.py").write_text("")
    r = subprocess.run(
        [str(copy / "generate.sh"), "--check"],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert r.returncode == 1
    assert "types_pb2.py is out of date" in r.stderr
    assert "old_pb2.py" in r.stderr
    assert "make proto" in r.stderr
