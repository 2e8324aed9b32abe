"""Who is calling: agents (certificate ``OU=agent``, node from the certificate or from a
Kubernetes ServiceAccount token) and operators (certificate ``OU=admin|read`` or a bearer
token from ``--tokens-file``), and what they may do.

* AgentService/Connect: with TLS on, the peer must present an agent certificate
  (``OU=agent``); operator certificates are refused. The node it registers as must then be
  proven, by ``--agent-identity``:

  - ``certificate`` (default; ``tracefleet certs agent --node N``): the certificate's CN or a
    DNS SAN equals the node name;
  - ``k8s-token`` (Kubernetes, one agent certificate shared by the DaemonSet): a projected
    ServiceAccount token, verified with TokenReview, names the node (``kubetoken``). This
    check applies with or without TLS.
* ControlService: ``read`` may call GetStatus, StreamEvents, GetTop and WatchAcks; only
  ``admin`` may call ConfigureEventSet. A bearer token (``authorization: Bearer T``)
  decides the identity when present; otherwise the operator certificate does. Agent
  certificates are refused.
* Unix socket (the default): the kernel checks the socket file's permissions at connect, so
  whoever got through has that socket's role (``with_role``): admin on the main socket (group
  ``tracefleet``), read on the ``-read`` one. A bearer token, when sent, still decides.
* TCP without TLS and no tokens file (``--insecure-listen``): everyone is admin.

Refusals are logged (WARNING) and counted by reason in ``REFUSALS``, which the metrics
endpoint serves as ``tracefleet_controller_refused_total{kind,reason}`` (``REASONS`` lists
every reason, so each series exists from the start).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from tracefleet.controller.api.kubetoken import (
    TOKEN_REASONS,
    AgentTokenVerifier,
    ReviewError,
)
from tracefleet.controller.common import env
from tracefleet.controller.common.certs import (
    OU_AGENT,
    OU_CONTROLLER,
    ROLE_ADMIN,
    ROLES,
)
from tracefleet.controller.common.configfile import load_yaml_or_json
from tracefleet.controller.domain.limits import REASONS as LIMIT_REASONS
from tracefleet.controller.domain.limits import REFUSALS, Refusals

log = logging.getLogger("tracefleet.controller.auth")

TOKENS_FILE_ENV = env.TOKENS_FILE

READ_METHODS = frozenset({"GetStatus", "StreamEvents", "GetTop", "WatchAcks"})
ADMIN_METHODS = frozenset({"ConfigureEventSet", "RemoveNode"})

# Every reason Authorizer refuses for (TLS handshake reasons are in tls.HANDSHAKE_REASONS).
REASONS = (
    "agent_no_certificate",
    "agent_not_agent_certificate",
    "agent_identity_mismatch",
    *(f"agent_{r}" for r in TOKEN_REASONS),
    "operator_agent_certificate",
    "operator_bad_token",
    "operator_not_operator_certificate",
    "operator_no_credentials",
    "operator_forbidden",
    "operator_unknown_method",
    *LIMIT_REASONS,
)
# grpc status of a refused agent, by reason (PERMISSION_DENIED otherwise)
_AGENT_CODES = {
    "agent_no_certificate": grpc.StatusCode.UNAUTHENTICATED,
    "agent_token_missing": grpc.StatusCode.UNAUTHENTICATED,
    "agent_token_unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "agent_token_review_failed": grpc.StatusCode.UNAVAILABLE,  # fail closed; agent retries
    "agent_node_read_failed": grpc.StatusCode.UNAVAILABLE,
}


def refusal_kind(reason: str) -> str:
    """agent, operator, tls, or other: the ``kind`` label of a refusal reason."""
    kind = reason.split("_", 1)[0]
    return kind if kind in ("agent", "operator", "tls") else "other"


@dataclass(frozen=True)
class Identity:
    kind: str  # "agent", "operator", "controller", "unknown"
    name: str
    role: str = ""  # operators: admin | read
    names: tuple[str, ...] = ()  # CN and DNS SANs (agents)
    via: str = "certificate"  # or "token", "insecure"


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(oid)]


def identity_from_pem(pem: bytes) -> Identity:
    cert = x509.load_pem_x509_certificate(pem)
    cns = _attr(cert.subject, NameOID.COMMON_NAME)
    ous = _attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    try:
        sans = tuple(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            .get_values_for_type(x509.DNSName)
        )  # fmt: skip
    except x509.ExtensionNotFound:
        sans = ()
    cn = cns[0] if cns else ""
    if len(ous) != 1:  # a certificate is one kind of thing, or none
        return Identity("unknown", cn, names=(*cns, *sans))
    ou = ous[0]
    if ou == OU_AGENT:
        return Identity("agent", cn, names=tuple(dict.fromkeys((*cns, *sans))))
    if ou in ROLES:
        return Identity("operator", cn, role=ou)
    if ou == OU_CONTROLLER:
        return Identity("controller", cn)
    return Identity("unknown", cn)


def peer_identity(context: Any) -> Identity | None:
    """The identity in the peer's client certificate, or None without TLS / certificate."""
    try:
        ac = context.auth_context() or {}
    except Exception:
        return None
    pems = ac.get("x509_pem_cert") or []
    if pems:
        try:
            return identity_from_pem(pems[0])
        except ValueError:
            return Identity("unknown", "")
    cns = ac.get("x509_common_name") or []
    if cns:  # no PEM (older grpc): the CN alone says nothing about the kind
        return Identity("unknown", cns[0].decode(errors="replace"))
    return None


# tokens ----------------------------------------------------------------------------------


class TokensError(Exception):
    pass


def load_tokens(path: str | Path) -> dict[str, Identity]:
    """``{sha256(token) hex: {name, role}}`` in YAML or JSON -> {digest: Identity}."""
    p = Path(path)
    data = load_yaml_or_json(p, "tokens file", TokensError)
    if isinstance(data, Mapping) and "tokens" in data and isinstance(data["tokens"], Mapping):
        data = data["tokens"]
    if not isinstance(data, Mapping):
        raise TokensError(
            f"tokens file {p}: expected a mapping of sha256 hex digest -> {{name, role}}"
        )
    out = {}
    for digest, entry in data.items():
        d = str(digest).lower().removeprefix("sha256:")
        if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
            raise TokensError(
                f"tokens file {p}: key {str(digest)[:16]!r}... is not a sha256 hex digest "
                "(store sha256(token), e.g. printf %s TOKEN | sha256sum)"
            )
        if not isinstance(entry, Mapping) or entry.get("role") not in ROLES:
            raise TokensError(
                f"tokens file {p}: entry {d[:12]}... needs name and role ({'|'.join(ROLES)})"
            )
        out[d] = Identity("operator", str(entry.get("name") or d[:12]), str(entry["role"]),
                          via="token")  # fmt: skip
    return out


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _bearer(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            v = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = v.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


# policy decisions ------------------------------------------------------------------------


class Authorizer:
    """Operator authentication and authorization, and the agent identity check."""

    def __init__(
        self,
        *,
        tls: bool,
        tokens: Mapping[str, Identity] | None = None,
        refusals: Refusals | None = None,
        agent_tokens: AgentTokenVerifier | None = None,
    ) -> None:
        self.tls = tls
        self.socket_role = ""  # unix socket: the role its file permissions grant
        self.tokens = dict(tokens or {})
        self.token_mode = tokens is not None
        self.refusals = refusals or REFUSALS
        # k8s-token mode: agents prove their node with a ServiceAccount token, not the
        # certificate (shared by every agent of the DaemonSet)
        self.agent_tokens = agent_tokens

    @property
    def open(self) -> bool:
        return not self.tls and not self.token_mode and not self.socket_role

    def with_role(self, role: str) -> Authorizer:
        """This authorizer for a unix socket whose permissions grant ``role``."""
        assert role in ROLES and not self.tls
        other = Authorizer(
            tls=False,
            tokens=self.tokens if self.token_mode else None,
            refusals=self.refusals,
            agent_tokens=self.agent_tokens,
        )
        other.socket_role = role
        return other

    def operator(self, context: Any, method: str) -> tuple[Identity | None, grpc.StatusCode, str]:
        """(identity, code, message); identity None means refused with that code."""
        peer = context.peer()
        cert = peer_identity(context) if self.tls else None
        if cert is not None and cert.kind == "agent":
            return self._deny(
                "operator_agent_certificate", peer, grpc.StatusCode.PERMISSION_DENIED,
                f"agent certificate ({cert.name}) cannot be used as operator credentials",
            )  # fmt: skip
        who: Identity | None = None
        token = _bearer(context) if self.token_mode else None
        if token is not None:
            found = None
            digest = token_digest(token)
            for d, ident in self.tokens.items():
                if hmac.compare_digest(d, digest):
                    found = ident
            if found is None:
                return self._deny(
                    "operator_bad_token", peer, grpc.StatusCode.UNAUTHENTICATED,
                    "unknown bearer token: check --token / TRACEFLEET_TOKEN",
                )  # fmt: skip
            who = found
        elif cert is not None:
            if cert.kind != "operator":
                return self._deny(
                    "operator_not_operator_certificate", peer, grpc.StatusCode.PERMISSION_DENIED,
                    f"certificate {cert.name!r} is not an operator certificate "
                    f"(needs OU=admin or OU=read; issue one with 'tracefleet certs operator')",
                )  # fmt: skip
            who = cert
        elif self.socket_role:
            who = Identity("operator", f"unix-socket-{self.socket_role}", self.socket_role,
                           via="unix socket")  # fmt: skip
        elif self.open:
            return (
                Identity("operator", "anonymous", ROLE_ADMIN, via="insecure"),
                grpc.StatusCode.OK,
                "",
            )
        else:
            return self._deny(
                "operator_no_credentials", peer, grpc.StatusCode.UNAUTHENTICATED,
                "credentials required: pass --token (or TRACEFLEET_TOKEN) or an operator "
                "certificate with --tls-dir",
            )  # fmt: skip
        if method in ADMIN_METHODS and who.role != ROLE_ADMIN:
            return self._deny(
                "operator_forbidden", peer, grpc.StatusCode.PERMISSION_DENIED,
                f"{who.name} (role {who.role}, via {who.via}) may not call {method}: "
                f"it needs role admin",
            )  # fmt: skip
        if method not in ADMIN_METHODS | READ_METHODS:
            return self._deny(
                "operator_unknown_method", peer, grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is not authorized for any role",
            )  # fmt: skip
        return who, grpc.StatusCode.OK, ""

    async def agent(self, context: Any, node_name: str) -> tuple[bool, grpc.StatusCode, str]:
        """(accepted, code, message) for an agent registering as ``node_name``."""
        peer = context.peer()
        if self.tls:
            cert = peer_identity(context)
            if cert is None:
                return self._deny_agent(
                    "agent_no_certificate", peer, f"node {node_name!r}: no client certificate"
                )
            if cert.kind != "agent":
                return self._deny_agent(
                    "agent_not_agent_certificate", peer,
                    f"node {node_name!r}: certificate {cert.name!r} ({cert.kind}) is not an "
                    f"agent certificate (needs OU=agent; issue one with 'tracefleet certs "
                    f"agent', or subject.organizationalUnits: [agent] with cert-manager)",
                )  # fmt: skip
            if self.agent_tokens is None and node_name not in cert.names:
                return self._deny_agent(
                    "agent_identity_mismatch", peer,
                    f"registers as node {node_name!r} but its certificate is for "
                    f"{', '.join(cert.names) or '?'}",
                )  # fmt: skip
        if self.agent_tokens is not None:
            token = _bearer(context)
            reason, message = await self.agent_tokens.verify(token, node_name)
            if reason:
                return self._deny_agent(f"agent_{reason}", peer, message)
        return True, grpc.StatusCode.OK, ""

    async def node_labels(self, context: Any, node_name: str) -> tuple[dict[str, str] | None, str]:
        """k8s-token mode: (labels of the agent's Node object, ""), or (None, why refused);
        other modes: (None, "") and the agent's own labels stand."""
        if self.agent_tokens is None:
            return None, ""
        try:
            return await self.agent_tokens.node_labels(node_name), ""
        except ReviewError as e:
            message = f"node {node_name!r}: cannot read its Node object, so refusing it: {e}"
            self._deny_agent("agent_node_read_failed", context.peer(), message)
            return None, message

    def _deny_agent(
        self, reason: str, peer: str, message: str
    ) -> tuple[bool, grpc.StatusCode, str]:
        code = _AGENT_CODES.get(reason, grpc.StatusCode.PERMISSION_DENIED)
        self._deny(reason, peer, code, message)
        return False, code, message

    def _deny(
        self, reason: str, peer: str, code: grpc.StatusCode, message: str
    ) -> tuple[None, grpc.StatusCode, str]:
        self.refusals.refuse(reason, peer, message)
        return None, code, message


async def require_operator(auth: Authorizer | None, context: Any, method: str) -> Identity | None:
    """Abort the RPC unless the caller may call ``method``."""
    if auth is None:
        return None
    who, code, message = auth.operator(context, method)
    if who is None:
        await context.abort(code, message)
        raise AssertionError("unreachable")
    return who
