"""mTLS and authorization against an in-process controller on a free loopback port: agent
identity, operator roles and tokens, certificate rotation without restart."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest

from tests.unit.controller_helpers import InProcessController
from tracefleet.controller.api.agent_api import AgentService
from tracefleet.controller.api.auth import (
    Authorizer,
    identity_from_pem,
    token_digest,
)
from tracefleet.controller.api.control_api import ControlService
from tracefleet.controller.api.tls import ServerTLS, handshake_reason
from tracefleet.controller.common import certs
from tracefleet.controller.domain.limits import Refusals
from tracefleet.controller.domain.policy import parse_policy
from tracefleet.controller.domain.redaction import default_patterns
from tracefleet.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    certs.init_ca(d)
    certs.issue_controller(d, d / "controller", [], [])
    certs.issue_agent(d, d / "web-1", "web-1")
    certs.issue_agent(d, d / "expired", "web-1", days=1,
                      not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))  # fmt: skip
    certs.issue_operator(d, d / "alice", "alice", "read")
    certs.issue_operator(d, d / "root", "root", "admin")
    other = d / "otherca"
    certs.init_ca(other, common_name="evil-ca")
    certs.issue_agent(other, other / "web-1", "web-1")
    return d


class TLSController(InProcessController):
    """The in-process controller serving TLS, with operator tokens and a policy."""

    def __init__(self, tls_dir: Path, tokens: dict | None = None, policy: dict | None = None):
        self.refusals = Refusals()
        self.tls = ServerTLS(tls_dir)
        self.auth = Authorizer(tls=True, tokens=tokens, refusals=self.refusals)
        self.policy = parse_policy(policy or {})
        super().__init__()

    def _services(self) -> tuple[AgentService, ControlService]:
        return (AgentService(self.controller, self.auth, self.policy.redact),
                ControlService(self.controller, self.auth, self.policy))  # fmt: skip

    def _bind(self, server: grpc.aio.Server, port: int) -> int:
        return server.add_secure_port(f"127.0.0.1:{port}", self.tls.credentials())


@pytest.fixture
def ctl(pki: Path):
    tokens = {
        token_digest("read-token"): {"name": "bob", "role": "read"},
        token_digest("admin-token"): {"name": "carol", "role": "admin"},
    }
    from tracefleet.controller.api.auth import Identity

    idents = {d: Identity("operator", v["name"], v["role"], via="token") for d, v in tokens.items()}
    c = TLSController(pki / "controller", tokens=idents,
                      policy={"allow": [{"event_set": "exec", "selector": "role=db"}],
                              "redact": [r"--password=(\S+)"]})  # fmt: skip
    yield c
    c.stop()


def channel(address: str, ca_dir: Path, leaf: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        (ca_dir / "ca.crt").read_bytes(), (leaf / "tls.key").read_bytes(),
        (leaf / "tls.crt").read_bytes(),
    )  # fmt: skip
    return grpc.secure_channel(address, creds)


def register(ch: grpc.Channel, node: str) -> agent_pb2.ControllerMessage:
    stub = agent_pb2_grpc.AgentServiceStub(ch)
    msgs = iter([agent_pb2.AgentMessage(register=agent_pb2.Register(node_name=node))])
    call = stub.Connect(msgs, timeout=5)
    try:
        return next(call)
    finally:
        call.cancel()


def test_certificates_carry_the_identity(pki: Path) -> None:
    a = identity_from_pem((pki / "web-1" / "tls.crt").read_bytes())
    assert (a.kind, a.name, "web-1" in a.names) == ("agent", "web-1", True)
    o = identity_from_pem((pki / "alice" / "tls.crt").read_bytes())
    assert (o.kind, o.name, o.role) == ("operator", "alice", "read")


def test_agent_with_its_own_certificate_gets_the_desired_state_with_redaction(ctl, pki):
    with channel(ctl.address, pki, pki / "web-1") as ch:
        msg = register(ch, "web-1")
    assert msg.WhichOneof("kind") == "desired_state"
    # the default rules (issue 15), then the policy's own
    assert list(msg.desired_state.redact_patterns) == [*default_patterns(), r"--password=(\S+)"]
    assert ctl.refusals.snapshot() == {}


def test_agent_registering_as_another_node_is_refused_logged_and_counted(ctl, pki, caplog):
    with channel(ctl.address, pki, pki / "web-1") as ch, pytest.raises(grpc.RpcError) as e:
        register(ch, "db-1")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "db-1" in e.value.details() and "web-1" in e.value.details()
    assert ctl.refusals.snapshot() == {"agent_identity_mismatch": 1}
    assert any("agent_identity_mismatch" in r.getMessage() for r in caplog.records)
    assert "db-1" not in ctl.controller.fleet.nodes


def test_operator_certificate_cannot_register_as_agent(ctl, pki):
    with channel(ctl.address, pki, pki / "root") as ch, pytest.raises(grpc.RpcError) as e:
        register(ch, "root")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ctl.refusals.snapshot() == {"agent_not_agent_certificate": 1}


@pytest.mark.parametrize("leaf", ["expired", "otherca/web-1"])
def test_expired_or_wrong_ca_certificates_are_refused_in_the_handshake(ctl, pki, leaf):
    with channel(ctl.address, pki, pki / leaf) as ch, pytest.raises(grpc.RpcError) as e:
        register(ch, "web-1")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "web-1" not in ctl.controller.fleet.nodes
    assert ctl.tls.handshakes >= 1  # grpc ran the handshake and rejected it itself


def _configure(ch: grpc.Channel, event_set: str, selector: str, token: str = ""):
    stub = control_pb2_grpc.ControlServiceStub(ch)
    md = [("authorization", f"Bearer {token}")] if token else None
    return stub.ConfigureEventSet(
        control_pb2.ConfigureEventSetRequest(event_set=event_set, enabled=True, selector=selector),
        timeout=5, metadata=md,
    )  # fmt: skip


def test_read_only_operator_may_read_but_not_configure(ctl, pki):
    with channel(ctl.address, pki, pki / "alice") as ch:
        control_pb2_grpc.ControlServiceStub(ch).GetStatus(control_pb2.GetStatusRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            _configure(ch, "exec", "role=db")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "alice" in e.value.details()
    with channel(ctl.address, pki, pki / "root") as ch:
        assert _configure(ch, "exec", "role=db").changed


def test_agent_certificate_is_not_an_operator_credential(ctl, pki):
    with channel(ctl.address, pki, pki / "web-1") as ch, pytest.raises(grpc.RpcError) as e:
        control_pb2_grpc.ControlServiceStub(ch).GetStatus(control_pb2.GetStatusRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ctl.refusals.snapshot() == {"operator_agent_certificate": 1}


def test_tokens_decide_the_role(ctl, pki):
    with channel(ctl.address, pki, pki / "alice") as ch:
        assert _configure(ch, "exec", "role=db", token="admin-token").changed
        for token, code in [("read-token", "PERMISSION_DENIED"), ("nope", "UNAUTHENTICATED")]:
            with pytest.raises(grpc.RpcError) as e:
                _configure(ch, "exec", "role=db", token=token)
            assert e.value.code().name == code


def test_policy_refuses_with_one_line_reason(ctl, pki):
    with channel(ctl.address, pki, pki / "root") as ch:
        for event_set, selector in [("exec", "all"), ("file", "role=db")]:
            with pytest.raises(grpc.RpcError) as e:
                _configure(ch, event_set, selector)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "policy" in e.value.details() and "\n" not in e.value.details()


def test_open_mode_without_tls_or_tokens_lets_everyone_in() -> None:
    class Ctx:
        def peer(self):
            return "ipv4:127.0.0.1:1"

        def invocation_metadata(self):
            return ()

    a = Authorizer(tls=False)
    who, code, _ = a.operator(Ctx(), "ConfigureEventSet")
    assert who is not None and who.role == "admin" and code == grpc.StatusCode.OK
    b = Authorizer(tls=False, tokens={})
    who, code, _ = b.operator(Ctx(), "GetStatus")
    assert who is None and code == grpc.StatusCode.UNAUTHENTICATED


def test_rotation_new_connections_use_the_new_certificate_without_restart(tmp_path, pki):
    # the controller's files are replaced by a certificate from a new CA: a client trusting
    # only the new CA fails before the rotation and connects after it, same server
    d = tmp_path / "ctl"
    certs.issue_controller(pki, d, [], [])
    c = TLSController(d)
    try:
        new = tmp_path / "newca"
        certs.init_ca(new)
        certs.issue_agent(new, new / "web-1", "web-1")
        with channel(c.address, new, new / "web-1") as ch, pytest.raises(grpc.RpcError):
            register(ch, "web-1")
        certs.issue_controller(new, tmp_path / "staged", [], [])
        for name in ("ca.crt", "tls.key", "tls.crt"):
            (d / name).write_bytes((tmp_path / "staged" / name).read_bytes())
        with channel(c.address, new, new / "web-1") as ch:
            assert register(ch, "web-1").WhichOneof("kind") == "desired_state"
        assert c.tls.reloads == 1
        with channel(c.address, pki, pki / "web-1") as ch, pytest.raises(grpc.RpcError):
            register(ch, "web-1")  # the old CA is no longer trusted
    finally:
        c.stop()


def test_half_written_files_keep_the_old_configuration(tmp_path, pki):
    d = tmp_path / "ctl"
    certs.issue_controller(pki, d, [], [])
    tls = ServerTLS(d)
    (d / "tls.key").write_text("garbage")
    assert tls._fetch() is None and tls.reloads == 0
    certs.issue_controller(pki, d, [], [])
    assert tls._fetch() is not None and tls.reloads == 1


def test_handshake_reasons() -> None:
    line = "Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL routines:"
    assert (
        handshake_reason(line + "CERTIFICATE_VERIFY_FAILED: certificate has expired") == "expired"
    )
    assert (
        handshake_reason(line + "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate")
        == "unknown_ca"
    )
    assert handshake_reason(line + "PEER_DID_NOT_RETURN_A_CERTIFICATE") == "no_client_certificate"
