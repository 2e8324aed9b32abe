"""Real processes on loopback: a tracefleet-controller with mTLS, tokens and a policy file, the
tracefleet CLI with operator certificates, and agents (ControlClient + a synthetic exec engine
in a thread of this process) with per-node certificates."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.fleet_helpers import PY, ClientThread, wait_until
from tests.loadgen import SyntheticEngine
from tests.ports import free_port
from tracefleet.agent.control.client import ClientOptions, ControlClient
from tracefleet.agent.control.tls import AgentTLS
from tracefleet.controller.api.auth import token_digest
from tracefleet.controller.common import certs


class ExecEngine(SyntheticEngine):
    """Synthetic exec events whose argv carries a secret."""

    def _event(self, cfg):  # type: ignore[no-untyped-def]
        ev = super()._event(cfg)
        ev["syscall"] = "execve"
        ev["args"] = {
            "filename": {"value": "/usr/bin/psql", "status": "ok", "strategy": "synthetic"},
            "argv": {
                "value": ["psql", "-h", "db", "--password=hunter2"],
                "status": "ok",
                "strategy": "synthetic",
            },
        }
        return ev


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    cli = [PY, "-m", "tracefleet.controller.operator.cli", "certs"]
    for args in (
        ["init", "--out", str(d)],
        ["controller", "--ca-dir", str(d), "--out", str(d / "controller"), "--ip", "127.0.0.1"],
        ["agent", "--ca-dir", str(d), "--node", "db-1", "--out", str(d / "db-1")],
        ["agent", "--ca-dir", str(d), "--node", "web-1", "--out", str(d / "web-1")],
        ["operator", "--ca-dir", str(d), "--name", "alice", "--role", "read",
         "--out", str(d / "alice")],
        ["operator", "--ca-dir", str(d), "--name", "root", "--role", "admin",
         "--out", str(d / "root")],
    ):  # fmt: skip
        r = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    certs.issue_agent(d, d / "expired", "db-1", days=1,
                      not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))  # fmt: skip
    certs.init_ca(d / "evil")
    certs.issue_agent(d / "evil", d / "evil" / "db-1", "db-1")
    # trusts the real CA (so the client accepts the controller), but signed by another CA
    (d / "evil" / "db-1" / "ca.crt").write_bytes((d / "ca.crt").read_bytes())
    return d


class Controller:
    def __init__(self, tmp: Path, pki: Path) -> None:
        self.log = tmp / "controller.log"
        self.address = f"127.0.0.1:{free_port()}"
        policy = tmp / "policy.yaml"
        policy.write_text(
            "allow:\n  - event_set: exec\n    selector: role=db\nredact:\n  - '--password=(\\S+)'\n"
        )
        tokens = tmp / "tokens.json"
        tokens.write_text(
            json.dumps({token_digest("s3cret-read"): {"name": "bob", "role": "read"}})
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "tracefleet.controller.server", "--listen", self.address, "--db",
                 ":memory:", "--tls-dir", str(pki / "controller"), "--policy", str(policy),
                 "--tokens-file", str(tokens), "--stale-after", "5", "--window", "5"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(lambda: "listening on" in self.text(), 30, "controller to listen")
        assert "(mTLS)" in self.text()

    def text(self) -> str:
        assert self.proc.poll() is None, self.log.read_text()
        return self.log.read_text()

    def cli(self, cert: Path | None, *args: str, token: str = "") -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEFLEET_")}
        if token:
            env["TRACEFLEET_TOKEN"] = token
        tls = ["--tls-dir", str(cert)] if cert else []
        return subprocess.run(
            [PY, "-m", "tracefleet.controller.operator.cli", "--controller", self.address,
             *tls, *args],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class Agent(ClientThread):
    def __init__(self, address: str, node: str, tls_dir: Path, labels: dict[str, str]) -> None:
        opts = ClientOptions(interval=0.2, backoff_initial=0.2, backoff_max=1.0,
                             offload_engine_calls=False, agent_version="test",
                             tls=AgentTLS(tls_dir))  # fmt: skip
        super().__init__(ControlClient(ExecEngine(200, seed=1), address, node, labels, opts))


@pytest.fixture
def controller(tmp_path: Path, pki: Path):
    c = Controller(tmp_path, pki)
    yield c
    c.stop()


def test_non_loopback_without_tls_is_refused_unless_insecure(tmp_path: Path) -> None:
    r = subprocess.run(
        [PY, "-m", "tracefleet.controller.server", "--listen", f"0.0.0.0:{free_port()}",
         "--db", ":memory:"],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("TRACEFLEET_")},
    )  # fmt: skip
    assert r.returncode == 2
    assert "without TLS" in r.stderr and "--tls-dir" in r.stderr


def test_agents_with_bad_certificates_are_refused_logged_and_counted(controller, pki) -> None:
    good = Agent(controller.address, "db-1", pki / "db-1", {"role": "db"})
    bad = [
        Agent(controller.address, "db-2", pki / "web-1", {"role": "db"}),  # other node's cert
        Agent(controller.address, "db-1", pki / "expired", {"role": "db"}),
        Agent(controller.address, "db-1", pki / "evil" / "db-1", {"role": "db"}),
    ]
    try:
        wait_until(lambda: good.client.connected and good.client.applied_generation >= 0
                   and good.client.stats.acks > 0, 20, "the good agent")  # fmt: skip
        log = wait_until(
            lambda: "(expired)" in (t := controller.text()) and "(unknown_ca)" in t
            and "agent_identity_mismatch" in t and t,
            20, "refusals in the controller log",
        )  # fmt: skip
    finally:
        for a in (good, *bad):
            a.stop()
    assert "refused a TLS client (expired)" in log
    assert "refused a TLS client (unknown_ca)" in log
    assert "registers as node 'db-2' but its certificate is for web-1" in log
    assert "[1 so far]" in log  # counted
    st = json.loads(controller.cli(pki / "alice", "status", "-o", "json").stdout)
    assert [n["name"] for n in st["nodes"]] == ["db-1"]


def test_read_only_operator_cannot_enable_and_policy_is_enforced(controller, pki) -> None:
    r = controller.cli(pki / "alice", "enable", "exec", "--selector", "role=db")
    assert r.returncode == 4, r.stderr
    assert "permission denied" in r.stderr and "alice" in r.stderr
    r = controller.cli(pki / "alice", "enable", "exec", "--selector", "role=db",
                       token="s3cret-read")  # fmt: skip
    assert r.returncode == 4 and "bob" in r.stderr
    r = controller.cli(pki / "db-1", "status")  # an agent certificate is no operator credential
    assert r.returncode == 4 and "agent certificate" in r.stderr
    r = controller.cli(None, "status")  # no client certificate: refused in the handshake
    assert r.returncode == 3
    r = controller.cli(pki / "root", "enable", "exec")  # all nodes: outside the policy
    assert r.returncode == 4 and "policy allows 'exec' only on nodes matching" in r.stderr
    r = controller.cli(pki / "root", "enable", "exec", "--selector", "role=db")
    assert r.returncode == 0, r.stderr
    assert controller.cli(pki / "alice", "status").returncode == 0


def test_redaction_removes_the_secret_before_events_reach_the_cli(controller, pki) -> None:
    agent = Agent(controller.address, "db-1", pki / "db-1", {"role": "db"})
    try:
        r = controller.cli(pki / "root", "enable", "exec", "--selector", "role=db", "--wait")
        assert r.returncode == 0, r.stderr
        r = controller.cli(pki / "alice", "events", "--event-set", "exec", "--count", "5",
                           "--duration", "20s", "-o", "json")  # fmt: skip
    finally:
        agent.stop()
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(events) == 5
    assert "hunter2" not in r.stdout
    for e in events:
        argv = e["args"]["argv"]
        assert "--password=***" in argv["value"] and argv["redacted"] is True


def test_agent_reconnects_with_rotated_certificate(controller, pki, tmp_path) -> None:
    tls_dir = tmp_path / "agent-tls"
    certs.issue_agent(pki, tls_dir, "db-1")
    agent = Agent(controller.address, "db-1", tls_dir, {"role": "db"})
    agent.client.options.tls_check_interval = 0.2
    try:
        wait_until(lambda: agent.client.stats.connects == 1 and agent.client.connected, 20)
        certs.issue_agent(pki, tls_dir, "db-1")  # renewed in place
        wait_until(lambda: agent.client.stats.connects >= 2 and agent.client.connected, 20,
                   "reconnect with the new files")  # fmt: skip
    finally:
        agent.stop()


def test_rejected_tls_handshake_is_reported_as_such(controller, pki) -> None:
    """issue 15: a certificate the controller rejects was reported as 'cannot reach'."""
    for leaf, cause in (
        (pki / "evil" / "db-1", "tls.crt is not signed by the CA in"),
        (pki / "expired", "tls.crt expired on"),
    ):
        r = controller.cli(leaf, "status")
        assert r.returncode == 4, r.stderr
        assert "TLS handshake with the controller" in r.stderr and cause in r.stderr, r.stderr
        assert "cannot reach" not in r.stderr
