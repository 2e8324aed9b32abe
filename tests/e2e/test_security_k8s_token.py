"""--agent-identity=k8s-token end to end: a real tracefleet-controller process with mTLS, a fake
Kubernetes API server (a stdlib HTTPS server in this process with its own CA, answering
TokenReviews the way kube-apiserver does), and agents (ControlClient + SyntheticEngine in
threads of this process) that all present ONE shared agent certificate, as the cert-manager
add-on issues it, and prove their node with a ServiceAccount token file."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.fleet_helpers import PY, ClientThread, wait_until
from tests.fake_kube_api import (
    AGENT_USER,
    API_AUDIENCE,
    AUDIENCE,
    CONTROLLER_API_TOKEN,
    FakeAPIServer,
    jwt,
)
from tests.loadgen import SyntheticEngine
from tests.ports import free_port
from tracefleet.agent.control.client import ClientOptions, ControlClient
from tracefleet.agent.control.tls import AgentTLS
from tracefleet.controller.common import certs


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    certs.init_ca(d)
    certs.issue_controller(d, d / "controller", [], ["127.0.0.1"])
    # ONE agent certificate for every agent (the cert-manager add-on's: CN=tracefleet-agent,
    # OU=agent): it says "an agent", the token says which node
    certs.issue(d, d / "shared-agent", common_name="tracefleet-agent", unit=certs.OU_AGENT)
    certs.issue_operator(d, d / "root", "root", "admin")
    return d


class ControllerProc:
    def __init__(self, tmp: Path, pki: Path, kube_api: str, api_ca: Path) -> None:
        creds = tmp / "serviceaccount"  # what kubelet mounts for the controller's pod
        creds.mkdir()
        (creds / "ca.crt").write_bytes(api_ca.read_bytes())
        (creds / "token").write_text(CONTROLLER_API_TOKEN + "\n")
        (creds / "namespace").write_text("tracefleet")
        self.log = tmp / "controller.log"
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics = f"127.0.0.1:{free_port()}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "tracefleet.controller.server", "--listen", self.address,
                 "--db", ":memory:", "--tls-dir", str(pki / "controller"),
                 "--agent-identity", "k8s-token", "--kube-api", kube_api,
                 "--kube-credentials", str(creds), "--metrics-listen", self.metrics,
                 "--stale-after", "5", "--window", "5"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(lambda: "listening on" in self.text(), 30, "controller to listen")
        assert "(mTLS), agent identity k8s-token" in self.text()

    def text(self) -> str:
        assert self.proc.poll() is None, self.log.read_text()
        return self.log.read_text()

    def refused(self) -> dict[str, float]:
        """tracefleet_controller_refused_total by reason, from /metrics."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "tracefleet_controller_refused":
                for s in fam.samples:
                    if s.name.endswith("_total"):
                        out[s.labels["reason"]] = s.value
        return out

    def nodes(self, pki: Path) -> list[str]:
        r = subprocess.run(
            [PY, "-m", "tracefleet.controller.operator.cli", "--controller", self.address,
             "--tls-dir", str(pki / "root"), "status", "-o", "json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return [n["name"] for n in json.loads(r.stdout)["nodes"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class Agent(ClientThread):
    """A control client with the shared agent certificate and a token file."""

    def __init__(self, address: str, node: str, tls_dir: Path, token_file: Path | None) -> None:
        opts = ClientOptions(interval=0.2, backoff_initial=0.2, backoff_max=1.0,
                             offload_engine_calls=False, agent_version="test",
                             tls=AgentTLS(tls_dir),
                             token_file=str(token_file) if token_file else "")  # fmt: skip
        super().__init__(ControlClient(SyntheticEngine(50, seed=1), address, node, {}, opts))

    def accepted(self) -> bool:
        return bool(self.client.stats.acks > 0)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeAPIServer(tmp_path_factory.mktemp("apiserver"))
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory, pki: Path, api: FakeAPIServer):
    c = ControllerProc(tmp_path_factory.mktemp("controller"), pki, api.url, api.ca)
    yield c
    c.stop()


def token_file(tmp_path: Path, token: str, name: str = "token") -> Path:
    p = tmp_path / name
    p.write_text(token + "\n")
    return p


def refused_agent(controller: ControllerProc, reason: str, node: str, pki: Path, agent: Agent,
                  before: float) -> str:  # fmt: skip
    """Wait until ``reason`` was counted once more than ``before``; check the agent never got
    a desired state and the node is unknown to the controller; return the controller log."""
    wait_until(lambda: controller.refused().get(reason, 0) > before, 30,
               f"{reason} counted in /metrics")  # fmt: skip
    log = controller.text()
    assert f"({reason}): " in log
    assert not agent.accepted(), f"{node}: got a desired state although refused"
    assert node not in controller.nodes(pki)
    return log


def test_agent_with_a_token_for_its_node_is_accepted_and_the_review_is_cached(
    controller, api, pki, tmp_path
) -> None:
    good = api.add("node-a")
    agent = Agent(controller.address, "node-a", pki / "shared-agent", token_file(tmp_path, good))
    try:
        wait_until(agent.accepted, 30, "node-a to get and ack the desired state")
    finally:
        agent.stop()
    assert "node-a" in controller.nodes(pki)
    (review,) = [r for r in api.reviews if r["spec"]["token"] == good]
    assert review["apiVersion"] == "authentication.k8s.io/v1" and review["kind"] == "TokenReview"
    assert review["spec"]["audiences"] == [AUDIENCE]
    assert f"Bearer {CONTROLLER_API_TOKEN}" in api.auth_headers  # its own token, from the file
    # a second connection with the same token within the cache time: no second review
    again = Agent(controller.address, "node-a", pki / "shared-agent", tmp_path / "token")
    try:
        wait_until(again.accepted, 30, "node-a to reconnect")
    finally:
        again.stop()
    assert api.reviews_of(good) == 1


def test_token_for_another_node_is_refused_logged_and_counted(controller, api, pki, tmp_path):
    before = controller.refused().get("agent_token_node_mismatch", 0)
    stolen = api.add("node-b")  # e.g. copied from node-b's agent pod
    agent = Agent(controller.address, "node-c", pki / "shared-agent",
                  token_file(tmp_path, stolen))  # fmt: skip
    try:
        log = refused_agent(controller, "agent_token_node_mismatch", "node-c", pki, agent, before)
    finally:
        agent.stop()
    assert ("registers as node 'node-c' but its token was issued to pod tracefleet-agent-node-b "
            "on node node-b") in log  # fmt: skip
    assert "so far]" in log


def test_unauthenticated_token_is_refused(controller, api, pki, tmp_path) -> None:
    before = controller.refused().get("agent_token_unauthenticated", 0)
    agent = Agent(controller.address, "node-d", pki / "shared-agent",
                  token_file(tmp_path, jwt("forged")))  # fmt: skip
    try:
        log = refused_agent(controller, "agent_token_unauthenticated", "node-d", pki, agent,
                            before)  # fmt: skip
    finally:
        agent.stop()
    assert "node 'node-d': the API server did not authenticate its token: [invalid bearer" in log


def test_token_of_another_audience_is_refused(controller, api, pki, tmp_path) -> None:
    # the pod's default token (audience: the API server): kube-apiserver itself refuses it
    before = controller.refused().get("agent_token_unauthenticated", 0)
    api_token = api.add("node-e", aud=(API_AUDIENCE,))
    agent = Agent(controller.address, "node-e", pki / "shared-agent",
                  token_file(tmp_path, api_token))  # fmt: skip
    try:
        log = refused_agent(controller, "agent_token_unauthenticated", "node-e", pki, agent,
                            before)  # fmt: skip
    finally:
        agent.stop()
    assert "is invalid for the target audiences ['tracefleet']" in log
    # an authenticator that ignores spec.audiences: the controller checks status.audiences
    before = controller.refused().get("agent_token_audience", 0)
    unaware = api.add("node-e", aud=(API_AUDIENCE,), unaware=True)
    agent = Agent(controller.address, "node-e", pki / "shared-agent",
                  token_file(tmp_path, unaware, "unaware"))  # fmt: skip
    try:
        log = refused_agent(controller, "agent_token_audience", "node-e", pki, agent, before)
    finally:
        agent.stop()
    assert "node 'node-e': token is not for audience 'tracefleet'" in log


def test_token_of_another_service_account_or_none_is_refused(controller, api, pki, tmp_path):
    before = controller.refused()
    other = api.add("node-f", user="system:serviceaccount:default:something-else")
    with_other = Agent(controller.address, "node-f", pki / "shared-agent",
                       token_file(tmp_path, other))  # fmt: skip
    without = Agent(controller.address, "node-g", pki / "shared-agent", None)
    try:
        log = refused_agent(controller, "agent_token_service_account", "node-f", pki, with_other,
                            before.get("agent_token_service_account", 0))  # fmt: skip
        log = refused_agent(controller, "agent_token_missing", "node-g", pki, without,
                            before.get("agent_token_missing", 0))  # fmt: skip
    finally:
        with_other.stop()
        without.stop()
    assert f"token of system:serviceaccount:default:something-else, not of {AGENT_USER}" in log
    assert "node 'node-g': no ServiceAccount token" in log


def test_token_file_is_reread_on_every_connection(controller, api, pki, tmp_path) -> None:
    """kubelet rotates the token in place: the agent picks the new file up by itself."""
    before = controller.refused().get("agent_token_node_mismatch", 0)
    path = token_file(tmp_path, api.add("node-x"))  # not this node's token (yet)
    agent = Agent(controller.address, "node-h", pki / "shared-agent", path)
    try:
        refused_agent(controller, "agent_token_node_mismatch", "node-h", pki, agent, before)
        path.write_text(api.add("node-h"))  # the file now holds this pod's token
        wait_until(agent.accepted, 30, "node-h accepted with the new token, no restart")
    finally:
        agent.stop()
    assert "node-h" in controller.nodes(pki)


def test_unreachable_api_server_refuses_agents_fail_closed(pki, api, tmp_path) -> None:
    dead = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    controller = ControllerProc(tmp_path, pki, dead, api.ca)
    good = api.add("node-a")  # a valid token: the API server would have accepted it
    agent = Agent(controller.address, "node-a", pki / "shared-agent", token_file(tmp_path, good))
    try:
        log = refused_agent(controller, "agent_token_review_failed", "node-a", pki, agent, 0)
    finally:
        agent.stop()
        controller.stop()
    line = next(x for x in log.splitlines() if "(agent_token_review_failed)" in x)
    assert "node 'node-a': cannot verify its ServiceAccount token, so refusing it" in line
    assert "(fail closed)" in line
    assert f"TokenReview at {dead}: ConnectionRefusedError" in line
    assert api.reviews_of(good) == 0


def test_labels_come_from_the_node_object_not_the_agent(controller, api, pki, tmp_path):
    """issue 15: in a cluster the agent's Node labels are used (read by the controller after
    the TokenReview), so selectors work, and an agent cannot claim other labels."""
    api.node_labels["node-l"] = {"role": "db", "topology.kubernetes.io/zone": "a"}
    good = api.add("node-l")
    opts = ClientOptions(interval=0.2, backoff_initial=0.2, backoff_max=1.0,
                         offload_engine_calls=False, agent_version="test",
                         tls=AgentTLS(pki / "shared-agent"),
                         token_file=str(token_file(tmp_path, good)))  # fmt: skip
    client = ControlClient(SyntheticEngine(50, seed=1), controller.address, "node-l",
                           {"role": "web", "zone": "z"}, opts)  # fmt: skip
    agent = ClientThread(client)
    try:
        wait_until(lambda: client.stats.acks > 0, 30, "node-l accepted")
        r = subprocess.run(
            [PY, "-m", "tracefleet.controller.operator.cli", "--controller", controller.address,
             "--tls-dir", str(pki / "root"), "-o", "json", "enable", "file", "--selector",
             "role=db,topology.kubernetes.io/zone=a"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "node-l" in json.loads(r.stdout)["matched_nodes"]
    finally:
        agent.stop()
    assert api.node_reads >= 1
    # a Node that cannot be read: refused, fail closed, counted
    before = controller.refused().get("agent_node_read_failed", 0)
    ghost = api.add("node-ghost")
    del api.node_labels["node-ghost"]
    agent = Agent(controller.address, "node-ghost", pki / "shared-agent",
                  token_file(tmp_path, ghost, "ghost"))  # fmt: skip
    try:
        log = refused_agent(controller, "agent_node_read_failed", "node-ghost", pki, agent,
                            before)  # fmt: skip
        assert "cannot read its Node object" in log and "HTTP 404" in log
    finally:
        agent.stop()
