"""--agent-identity=k8s-token pieces, in process: in-cluster configuration, the TokenReview
client against a fake API server (tests/fake_kube_api.py), its cache, every way a review can
fail (all fail closed), the refusal metric, and the agent's token file handling."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_kube_api import AGENT_USER, AUDIENCE, CONTROLLER_API_TOKEN, FakeAPIServer, jwt
from tracefleet.agent import cli as agent_cli
from tracefleet.agent.control.satoken import AgentTokenError, read_token, token_metadata
from tracefleet.controller import server
from tracefleet.controller.api import kubetoken as kt
from tracefleet.controller.api import metrics as cm
from tracefleet.controller.common import certs, env
from tracefleet.controller.domain.controller import Controller
from tracefleet.controller.domain.limits import Refusals
from tracefleet.controller.storage.store import Store


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeAPIServer(tmp_path_factory.mktemp("apiserver"))
    yield fake
    fake.stop()


@pytest.fixture
def creds(tmp_path: Path, api: FakeAPIServer) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "ca.crt").write_bytes(api.ca.read_bytes())
    (d / "token").write_text(CONTROLLER_API_TOKEN)
    (d / "namespace").write_text("tracefleet\n")
    return d


@pytest.fixture(autouse=True)
def _no_forced_answer(api: FakeAPIServer):
    api.forced = None
    yield
    api.forced = None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reviewer(api: FakeAPIServer, creds: Path, **kw) -> kt.TokenReviewer:
    return kt.TokenReviewer(kt.in_cluster(api.url, creds), AUDIENCE, **kw)


def review(r: kt.TokenReviewer, token: str) -> kt.Review:
    return asyncio.run(r.review(token))


# in-cluster configuration ---------------------------------------------------------------


def test_in_cluster_address_from_the_service_variables(creds: Path) -> None:
    environ = {env.KUBERNETES_SERVICE_HOST: "10.96.0.1", env.KUBERNETES_SERVICE_PORT: "443"}
    a = kt.in_cluster("", creds, environ)
    assert (a.url, a.host, a.port) == ("https://10.96.0.1:443", "10.96.0.1", 443)
    assert (a.ca_file, a.token_file) == (creds / "ca.crt", creds / "token")
    environ = {env.KUBERNETES_SERVICE_HOST: "fd00:10:96::1", env.KUBERNETES_SERVICE_PORT: "6443"}
    a = kt.in_cluster("", creds, environ)
    assert (a.url, a.host, a.port) == ("https://[fd00:10:96::1]:6443", "fd00:10:96::1", 6443)


@pytest.mark.parametrize(
    ("api_url", "environ", "remove", "message"),
    [
        ("", {}, None, "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set"),
        ("http://10.0.0.1:6443", {}, None, "expected https://HOST[:PORT]"),
        ("https://10.0.0.1:99999", {}, None, "expected https://HOST[:PORT]"),
        ("https://10.0.0.1/api", {}, None, "expected https://HOST[:PORT]"),
        ("https://10.0.0.1", {}, "ca.crt", "the Deployment's kube-api volume"),
        ("https://10.0.0.1", {}, "token", "token: No such file"),
    ],
)
def test_in_cluster_errors_name_the_fix(creds, api_url, environ, remove, message) -> None:
    if remove:
        (creds / remove).unlink()
    with pytest.raises(kt.KubeConfigError) as e:
        kt.in_cluster(api_url, creds, environ)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_service_account_username() -> None:
    assert kt.service_account_username("tracefleet/tracefleet-agent") == AGENT_USER
    assert kt.service_account_username("tracefleet:tracefleet-agent") == AGENT_USER
    for bad in ("tracefleet", "/agent", "ns/", "a/b/c"):
        with pytest.raises(kt.KubeConfigError, match="expected NAMESPACE/NAME"):
            kt.service_account_username(bad)


def test_controller_refuses_to_start_without_what_k8s_token_needs(
    tmp_path, creds, monkeypatch, capsys
) -> None:
    for var in (env.KUBERNETES_SERVICE_HOST, env.KUBERNETES_SERVICE_PORT, env.AGENT_IDENTITY):
        monkeypatch.delenv(var, raising=False)
    base = ["--listen", "127.0.0.1:0", "--insecure-listen", "--db", ":memory:"]
    assert server.main([*base, "--agent-identity", "k8s-token"]) == 2
    err = capsys.readouterr().err
    assert "needs the Kubernetes API server" in err and "--kube-api" in err
    (creds / "namespace").unlink()
    argv = [*base, "--agent-identity", "k8s-token", "--kube-api", "https://127.0.0.1:1",
            "--kube-credentials", str(creds)]  # fmt: skip
    assert server.main(argv) == 2
    assert "pass --agent-service-account NAMESPACE/NAME" in capsys.readouterr().err
    monkeypatch.setenv(env.AGENT_IDENTITY, "k8s")  # a typo must not fall back silently
    assert server.main(base) == 2
    assert "TRACEFLEET_AGENT_IDENTITY='k8s': use one of certificate, k8s-token" in (
        capsys.readouterr().err
    )


# TokenReview ----------------------------------------------------------------------------


def test_review_of_a_bound_token(api, creds) -> None:
    token = api.add("node-a")
    r = review(reviewer(api, creds), token)
    assert r.authenticated and r.username == AGENT_USER and r.audiences == (AUDIENCE,)
    assert r.extra[kt.NODE_NAME_KEY] == ("node-a",)
    assert api.reviews[-1]["spec"] == {"token": token, "audiences": [AUDIENCE]}
    assert api.auth_headers[-1] == f"Bearer {CONTROLLER_API_TOKEN}"


def test_reviews_are_cached_briefly_and_never_past_the_token_expiry(api, creds) -> None:
    clock = Clock()
    rv = reviewer(api, creds, cache_seconds=30, clock=clock)
    long_lived, short = api.add("node-a"), api.add("node-a", exp_in=5)
    for token in (long_lived, short):
        review(rv, token)
        review(rv, token)
        assert api.reviews_of(token) == 1
    clock.now += 10  # past the short token's exp, within cache_seconds
    review(rv, long_lived)
    review(rv, short)
    assert (api.reviews_of(long_lived), api.reviews_of(short)) == (1, 2)
    clock.now += 25  # past cache_seconds
    review(rv, long_lived)
    assert api.reviews_of(long_lived) == 2
    expired = api.add("node-a", exp_in=-1)  # never cached
    review(rv, expired)
    review(rv, expired)
    assert api.reviews_of(expired) == 2
    bounded = reviewer(api, creds, max_cached=2)
    tokens = [api.add("node-b") for _ in range(3)]
    for t in tokens:
        review(bounded, t)
    review(bounded, tokens[0])  # evicted, the oldest
    review(bounded, tokens[2])  # still cached
    assert [api.reviews_of(t) for t in tokens] == [2, 1, 1]


def test_the_controller_token_is_reread_for_every_review(api, creds) -> None:
    rv = reviewer(api, creds)
    review(rv, api.add("node-a"))
    (creds / "token").write_text("rotated-by-kubelet")
    with pytest.raises(kt.ReviewError) as e:  # the fake knows only the first token
        review(rv, api.add("node-a"))
    assert api.auth_headers[-1] == "Bearer rotated-by-kubelet"
    assert "HTTP 401" in str(e.value) and "may not create tokenreviews" in str(e.value)
    assert "deploy/kubernetes/controller/rbac.yaml" in str(e.value)


@pytest.mark.parametrize(
    ("forced", "message"),
    [
        ((403, b'{"kind":"Status","code":403}'), "HTTP 403: the controller's ServiceAccount"),
        ((500, b"etcdserver: request timed out"), "HTTP 500 Internal Server Error: etcdserver"),
        ((201, b"<html>proxy</html>"), "the answer is not JSON"),
        ((201, b'{"kind":"Status"}'), "did not answer with a TokenReview"),
        ((201, b'{"kind":"TokenReview","status":[]}'), "malformed TokenReview status"),
    ],
)
def test_unusable_answers_are_review_errors(api, creds, forced, message) -> None:
    api.forced = forced
    token = api.add("node-a")
    rv = reviewer(api, creds)
    with pytest.raises(kt.ReviewError) as e:
        review(rv, token)
    assert message in str(e.value) and "\n" not in str(e.value)
    api.forced = None
    assert review(rv, token).authenticated  # failures are not cached


def test_api_server_with_another_ca_is_not_trusted(api, creds, tmp_path) -> None:
    certs.init_ca(tmp_path / "other")
    (creds / "ca.crt").write_bytes((tmp_path / "other" / "ca.crt").read_bytes())
    with pytest.raises(kt.ReviewError, match="SSLCertVerificationError"):
        review(reviewer(api, creds), api.add("node-a"))


# verdicts -------------------------------------------------------------------------------


def verify(api, creds, token, node: str = "node-a") -> tuple[str, str]:
    v = kt.AgentTokenVerifier(reviewer(api, creds), username=AGENT_USER)
    return asyncio.run(v.verify(token, node))


def test_verdicts(api, creds) -> None:
    assert verify(api, creds, api.add("node-a")) == ("", "")
    assert verify(api, creds, api.add("node-b"))[0] == "token_node_mismatch"
    assert verify(api, creds, None)[0] == "token_missing"
    assert verify(api, creds, "")[0] == "token_missing"
    assert verify(api, creds, jwt("forged"))[0] == "token_unauthenticated"
    reason, message = verify(api, creds, api.add("node-a", no_node=True))
    assert reason == "token_no_node"
    assert "Kubernetes >= 1.30 with ServiceAccountTokenPodNodeInfo" in message
    n = len(api.reviews)
    assert verify(api, creds, "x" * (kt.MAX_TOKEN_BYTES + 1))[0] == "token_unauthenticated"
    assert len(api.reviews) == n  # not even sent to the API server


def test_every_refusal_reason_is_served_from_zero() -> None:
    refusals = Refusals()
    refusals.refuse("agent_token_node_mismatch", "ipv4:10.0.0.7:5000", "x", log_it=False)
    refusals.refuse("agent_token_node_mismatch", "ipv4:10.0.0.7:5001", "x", log_it=False)
    store = Store(":memory:")
    try:
        collector = cm.ControllerCollector(Controller(store), cm.FleetTotals(), refusals)
        reg = CollectorRegistry(auto_describe=False)
        reg.register(collector)
        text = generate_latest(reg).decode()
    finally:
        store.close()
    (fam,) = [f for f in text_string_to_metric_families(text)
              if f.name == "tracefleet_controller_refused"]  # fmt: skip
    got = {s.labels["reason"]: (s.labels["kind"], s.value)
           for s in fam.samples if s.name.endswith("_total")}  # fmt: skip
    assert got["agent_token_node_mismatch"] == ("agent", 2)
    assert got["agent_token_review_failed"] == ("agent", 0)
    assert got["operator_forbidden"] == ("operator", 0)
    assert got["tls_unknown_ca"] == ("tls", 0)
    assert set(got) == set(cm.REFUSAL_REASONS)


# the agent's side -----------------------------------------------------------------------


def test_agent_token_file(tmp_path: Path) -> None:
    p = tmp_path / "token"
    p.write_text("eyJhbGciOi.eyJleHAiOjF9.c2ln\n")
    assert read_token(p) == "eyJhbGciOi.eyJleHAiOjF9.c2ln"
    assert token_metadata(p) == (("authorization", "Bearer eyJhbGciOi.eyJleHAiOjF9.c2ln"),)
    for content in ("", "\n", "two tokens"):
        p.write_text(content)
        with pytest.raises(AgentTokenError, match="does not hold one ServiceAccount token"):
            read_token(p)
    with pytest.raises(AgentTokenError, match="mount a projected serviceAccountToken volume"):
        read_token(tmp_path / "missing")


def test_agent_run_with_an_unreadable_token_file_exits_with_the_fix(tmp_path, capsys) -> None:
    rc = agent_cli.main(["run", "--controller", "127.0.0.1:1", "--token-file",
                         str(tmp_path / "nope"), "--metrics-listen", "off"])  # fmt: skip
    assert rc == agent_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot read the ServiceAccount token" in err
    assert "TRACEFLEET_AGENT_TOKEN_FILE" in err and err.count("\n") <= 2
