"""Secure by default (issue 15): without TLS flags the controller serves a unix socket whose
file permissions decide who calls (root or the admin group: admin and agents; the read group,
on the -read socket: read); anyone else is refused by the kernel. Real controller processes,
real unprivileged callers (setpriv to nobody), real groups (made for the test)."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
from pathlib import Path

from tests.conftest import require_root
from tests.e2e.fleet_helpers import PY
from tests.e2e.security_helpers import (
    RawAgent,
    as_user,
    start_controller,
    tf,
)
from tests.ports import free_port
from tracefleet.v1 import agent_pb2, types_pb2

RAW_CONFIGURE = """
import sys, grpc
from tracefleet.v1 import control_pb2, control_pb2_grpc
ch = grpc.insecure_channel(sys.argv[1])
try:
    control_pb2_grpc.ControlServiceStub(ch).ConfigureEventSet(
        control_pb2.ConfigureEventSetRequest(event_set="net", enabled=True), timeout=20)
    print("ACCEPTED")
except grpc.RpcError as e:
    print("REFUSED", e.code().name, e.details())
"""


def test_unix_socket_by_default_checks_who_calls(sockdir: Path, groups) -> None:
    admin, read = groups
    proc = start_controller(sockdir, groups)
    try:
        main, ro = sockdir / "ctl.sock", sockdir / "ctl-read.sock"
        for path, group in ((main, admin), (ro, read)):
            st = path.stat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, path
            assert st.st_uid == 0 and st.st_gid == grp.getgrnam(group).gr_gid, path

        # root: admin
        r = tf(sockdir, "enable", "file", "--ttl", "10m")
        assert r.returncode == 0, r.stderr

        # nobody, no group: refused by the kernel, before any gRPC; the CLI names the fix
        r = tf(sockdir, "status", group="")
        assert r.returncode == 4 and "permission denied" in r.stderr, r.stderr
        assert "join the controller's admin group" in r.stderr, r.stderr
        for path in (main, ro):  # a raw client, not the CLI's own check
            raw = subprocess.run(as_user(PY, "-c", RAW_CONFIGURE, f"unix:{path}"),
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
            assert raw.stdout.startswith("REFUSED UNAVAILABLE"), raw.stdout + raw.stderr
            assert "ermission denied" in raw.stdout, raw.stdout

        # nobody in the read group: reads (through the -read socket), cannot change anything
        r = tf(sockdir, "-o", "json", "status", group=read)
        assert r.returncode == 0, r.stderr
        r = tf(sockdir, "enable", "net", group=read)
        assert r.returncode == 4 and "role read" in r.stderr and "admin" in r.stderr, r.stderr
        raw = subprocess.run(as_user(PY, "-c", RAW_CONFIGURE, f"unix:{ro}", group=read),
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert raw.stdout.startswith("REFUSED PERMISSION_DENIED"), raw.stdout + raw.stderr
        # ... and no agent may register there (no AgentService on the read socket)
        reg = subprocess.run(
            as_user(PY, "-c", RAW_REGISTER, f"unix:{ro}", group=read),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert reg.stdout.startswith("REFUSED UNIMPLEMENTED"), reg.stdout + reg.stderr

        # nobody in the admin group: admin
        r = tf(sockdir, "enable", "net", "--ttl", "10m", group=admin)
        assert r.returncode == 0, r.stderr

        # a second controller must not steal the live socket
        second = subprocess.run(
            [PY, "-m", "tracefleet.controller.server", "--listen", f"unix:{main}",
             "--db", ":memory:"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 1 and "another process serves" in second.stderr
        assert tf(sockdir, "status").returncode == 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not (sockdir / "ctl.sock").exists()


RAW_REGISTER = """
import sys, grpc
from tracefleet.v1 import agent_pb2, agent_pb2_grpc
ch = grpc.insecure_channel(sys.argv[1])
msg = agent_pb2.AgentMessage(register=agent_pb2.Register(node_name="prod-db-1"))
try:
    for m in agent_pb2_grpc.AgentServiceStub(ch).Connect(iter([msg]), timeout=20):
        print("ACCEPTED")
        break
except grpc.RpcError as e:
    print("REFUSED", e.code().name, e.details())
"""


def test_tcp_without_tls_needs_the_explicit_flag(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    r = subprocess.run(
        [PY, "-m", "tracefleet.controller.server", "--listen", addr, "--db", ":memory:"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "refusing to serve" in r.stderr and "--insecure-listen" in r.stderr
    assert "every local user" in r.stderr


def test_read_role_never_sees_a_secret_an_agent_left_in(sockdir: Path, groups) -> None:
    """An agent that skips redaction (old or hostile): the controller masks it for viewers."""
    _, read = groups
    proc = start_controller(sockdir, groups)
    agent = RawAgent(f"unix:{sockdir}/ctl.sock", "db-1")
    viewer = None
    try:
        agent.wait_for("desired_state", 60)
        viewer = subprocess.Popen(
            as_user(PY, "-m", "tracefleet.controller.operator.cli", "--controller",
                    f"unix:{sockdir}/ctl.sock", "-o", "json", "events", "--count", "1",
                    "--duration", "120", group=read),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # the viewer is subscribed once the controller asks the agent to sample
        agent.wait_for("sample_request", 120)
        ev = types_pb2.Event(event_set="exec", syscall="execve", pid=7, comm="psql")
        ev.args["argv"].value = str(["psql", "--password", "hunter2", "-h", "db"])
        ev.args["envp"].value = str(["PGPASSWORD=s3cr3t"])
        agent.out.put(
            agent_pb2.AgentMessage(
                result_batch=agent_pb2.ResultBatch(instance_id="raw-1", seq=1, events=[ev])
            )
        )
        out, err = viewer.communicate(timeout=120)
        assert viewer.returncode == 0, err
        assert "hunter2" not in out and "s3cr3t" not in out, out
        assert "***" in out and '"redacted": true' in out, out
        log = (sockdir / "controller.log").read_text()
        assert "node db-1 sent 2 unredacted secret value(s): masked by the controller" in log
    finally:
        agent.close()
        if viewer is not None and viewer.poll() is None:
            viewer.kill()
        proc.terminate()
        proc.wait(timeout=60)


def test_missing_groups_leave_the_socket_to_root_only(sockdir: Path) -> None:
    require_root()
    proc = start_controller(sockdir, ("tft-no-such-group", "tft-no-such-read"))
    try:
        st = (sockdir / "ctl.sock").stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        log = (sockdir / "controller.log").read_text()
        assert "group 'tft-no-such-group' does not exist" in log and "groupadd" in log
        assert tf(sockdir, "status").returncode == 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert os.path.exists(sockdir)
