"""Which node an agent runs on, from a Kubernetes ServiceAccount token
(``--agent-identity=k8s-token``).

In Kubernetes every pod of the agent DaemonSet mounts the same Secret, so the client
certificate says "a tracefleet agent", never which node. The node comes from a projected
ServiceAccount token instead: kubelet requests it for the agent's pod with the audience
``tracefleet`` and rotates it on disk; the API server writes the pod's ``spec.nodeName`` into
it (ServiceAccountTokenPodNodeInfo: beta and on by default since Kubernetes 1.30, GA in
1.32). The agent sends it as ``authorization: Bearer`` metadata of Connect, re-read from disk
for every connection. The controller asks the API server (TokenReview) and accepts the agent
only if the review has

* ``status.authenticated`` true;
* the expected audience in ``status.audiences``;
* ``status.user.username`` = ``system:serviceaccount:<namespace>:<agent ServiceAccount>``;
* ``status.user.extra["authentication.kubernetes.io/node-name"]`` = exactly the node name the
  agent registers as.

Once accepted, the agent's labels are those of its Node object (``GET /api/v1/nodes/N``,
the controller's ServiceAccount needs ``get`` on nodes; cached like reviews), not the ones
the agent sends: selectors such as ``role=db`` work in a cluster, and an agent cannot claim
labels its node does not have.

Reviews are cached for a short while (never past the token's own ``exp``); an API server
that cannot be reached or does not answer with a TokenReview refuses the agent (fail
closed). Only the standard library talks to the API server: the controller image stays
small.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import logging
import os
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tracefleet.controller.common import env

log = logging.getLogger("tracefleet.controller.kubetoken")

MODE_CERTIFICATE = "certificate"
MODE_K8S_TOKEN = "k8s-token"
MODES = (MODE_CERTIFICATE, MODE_K8S_TOKEN)

NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
# Where kubelet mounts the pod's own API credentials (token, ca.crt, namespace).
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_AUDIENCE = "tracefleet"
DEFAULT_AGENT_SERVICE_ACCOUNT = "tracefleet-agent"  # in the controller's own namespace
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
MAX_TOKEN_BYTES = 16 * 1024  # a ServiceAccount JWT is ~1 KiB; never forward megabytes
MAX_RESPONSE_BYTES = 1 << 20


class KubeConfigError(Exception):
    """The controller cannot talk to the API server at all (startup); one line with the fix."""


class ReviewError(Exception):
    """This review could not be made (network, TLS, HTTP status, not a TokenReview)."""


@dataclass(frozen=True)
class Review:
    """What the API server said about one token."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""

    @classmethod
    def from_json(cls, doc: Any) -> Review:
        if not isinstance(doc, Mapping) or doc.get("kind") != "TokenReview":
            raise ReviewError("the API server did not answer with a TokenReview")
        status = doc.get("status")
        if not isinstance(status, Mapping):
            raise ReviewError("malformed TokenReview status")
        user = status.get("user") or {}
        if not isinstance(user, Mapping):
            raise ReviewError("malformed TokenReview status.user")
        extra = user.get("extra") or {}
        return cls(
            authenticated=status.get("authenticated") is True,
            username=str(user.get("username") or ""),
            audiences=tuple(str(a) for a in status.get("audiences") or ()),
            extra={
                str(k): tuple(str(x) for x in (v if isinstance(v, list) else [v]))
                for k, v in (extra.items() if isinstance(extra, Mapping) else ())
            },
            error=str(status.get("error") or ""),
        )


@dataclass(frozen=True)
class APIServer:
    """Where and how to reach the Kubernetes API server (in-cluster configuration)."""

    url: str  # https://host:port
    host: str
    port: int
    ca_file: Path
    token_file: Path  # the controller's own token: re-read per request (kubelet rotates it)


def in_cluster(
    api_url: str = "",
    credentials_dir: str | os.PathLike[str] = SERVICEACCOUNT_DIR,
    environ: Mapping[str, str] = os.environ,
) -> APIServer:
    """The API server from ``api_url`` or KUBERNETES_SERVICE_HOST/PORT, with the CA and token
    of ``credentials_dir``; KubeConfigError (with the fix) if unusable."""
    if not api_url:
        host = environ.get(env.KUBERNETES_SERVICE_HOST, "")
        port = environ.get(env.KUBERNETES_SERVICE_PORT, "")
        if not host or not port:
            raise KubeConfigError(
                f"--agent-identity={MODE_K8S_TOKEN} needs the Kubernetes API server, but "
                f"{env.KUBERNETES_SERVICE_HOST}/{env.KUBERNETES_SERVICE_PORT} are not set (not "
                "running in a pod?); pass --kube-api https://HOST:PORT"
            )
        api_url = f"https://{f'[{host}]' if ':' in host else host}:{port}"
    parts = urlsplit(api_url)
    try:
        port_n = parts.port or 443
    except ValueError:
        port_n = 0
    if parts.scheme != "https" or not parts.hostname or not port_n or parts.path not in ("", "/"):
        raise KubeConfigError(f"--kube-api {api_url!r}: expected https://HOST[:PORT]")
    d = Path(credentials_dir)
    for name in ("ca.crt", "token"):
        try:
            (d / name).read_bytes()
        except OSError as e:
            raise KubeConfigError(
                f"cannot read {d / name}: {e.strerror}; mount the controller's ServiceAccount "
                "token, CA and namespace there (the Deployment's kube-api volume, or "
                "automountServiceAccountToken: true), or pass --kube-credentials DIR"
            ) from None
    url = f"https://{f'[{parts.hostname}]' if ':' in parts.hostname else parts.hostname}:{port_n}"
    return APIServer(url, parts.hostname, port_n, d / "ca.crt", d / "token")


def own_namespace(credentials_dir: str | os.PathLike[str] = SERVICEACCOUNT_DIR) -> str:
    try:
        return (Path(credentials_dir) / "namespace").read_text().strip()
    except OSError:
        return ""


def service_account_username(namespace_name: str) -> str:
    """``NAMESPACE/NAME`` (or ``NAMESPACE:NAME``) -> system:serviceaccount:NAMESPACE:NAME."""
    ns, sep, name = namespace_name.replace(":", "/").partition("/")
    if not sep or not ns or not name or "/" in name:
        raise KubeConfigError(
            f"--agent-service-account {namespace_name!r}: expected NAMESPACE/NAME, e.g. "
            f"tracefleet/{DEFAULT_AGENT_SERVICE_ACCOUNT}"
        )
    return f"system:serviceaccount:{ns}:{name}"


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (not verified: only to bound the cache), or None."""
    try:
        payload = token.split(".")[1]
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = doc.get("exp")
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError, AttributeError):
        return None


class TokenReviewer:
    """POST TokenReviews to the API server, with a short cache keyed by the token's digest.

    Only answers are cached (authenticated or not), for at most ``cache_seconds`` and never
    past the token's ``exp``; failures to ask are not, so they are retried on the agent's
    next connection. At most ``concurrency`` reviews run at once (a fleet reconnecting after
    a controller restart must not exhaust the thread pool or flood the API server)."""

    def __init__(
        self,
        api: APIServer,
        audience: str,
        *,
        timeout: float = 5.0,
        cache_seconds: float = 30.0,
        max_cached: int = 8192,
        concurrency: int = 8,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.audience = audience
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.max_cached = max_cached
        self.requests = 0  # TokenReviews sent to the API server
        self._clock = clock
        self._wall = wall
        self._cache: OrderedDict[str, tuple[float, Review]] = OrderedDict()
        self._sem = asyncio.Semaphore(concurrency)
        self._ctx_lock = threading.Lock()
        self._ctx: ssl.SSLContext | None = None
        self._ctx_stamp: tuple[int, int, int] = (0, 0, 0)

    async def review(self, token: str) -> Review:
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cached(key)
        if cached is not None:
            return cached
        async with self._sem:
            cached = self._cached(key)  # another connection of the same agent may have asked
            if cached is not None:
                return cached
            review = await asyncio.to_thread(self.post, token)
        ttl = self.cache_seconds
        exp = token_expiry(token)
        if exp is not None:
            ttl = min(ttl, exp - self._wall())
        if ttl > 0:
            self._cache[key] = (self._clock() + ttl, review)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return review

    def _cached(self, key: str) -> Review | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        if hit[0] <= self._clock():
            del self._cache[key]
            return None
        return hit[1]

    def _context(self) -> ssl.SSLContext:
        """TLS context trusting ca.crt; rebuilt when the file changes (kube-root-ca.crt is a
        ConfigMap that can be rotated)."""
        try:
            st = os.stat(self.api.ca_file)
        except OSError as e:
            raise ReviewError(f"cannot read {self.api.ca_file}: {e.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._ctx_lock:
            if self._ctx is None or stamp != self._ctx_stamp:
                try:
                    ctx = ssl.create_default_context(cafile=str(self.api.ca_file))
                except (OSError, ssl.SSLError) as e:
                    raise ReviewError(f"bad CA file {self.api.ca_file}: {e}") from None
                self._ctx, self._ctx_stamp = ctx, stamp
            return self._ctx

    def get_node_labels(self, node: str) -> dict[str, str]:
        """``metadata.labels`` of Node ``node``, synchronously; ReviewError naming the fix."""
        from urllib.parse import quote

        where = f"Node {node!r} at {self.api.url}"
        try:
            bearer = self.api.token_file.read_text().strip()
        except OSError as e:
            raise ReviewError(
                f"cannot read the controller's own token {self.api.token_file}: {e.strerror}"
            ) from None
        conn = http.client.HTTPSConnection(
            self.api.host, self.api.port, context=self._context(), timeout=self.timeout
        )
        try:
            conn.request(
                "GET",
                f"/api/v1/nodes/{quote(node, safe='')}",
                headers={"Authorization": f"Bearer {bearer}", "Accept": "application/json",
                         "User-Agent": "tracefleet-controller"},
            )  # fmt: skip
            resp = conn.getresponse()
            data = resp.read(MAX_RESPONSE_BYTES)
        except (OSError, http.client.HTTPException) as e:
            raise ReviewError(f"{where}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        if resp.status in (401, 403):
            raise ReviewError(
                f"{where}: HTTP {resp.status}: the controller's ServiceAccount may not get "
                "nodes (apply ClusterRole tracefleet-controller, "
                "deploy/kubernetes/controller/rbac.yaml)"
            )
        if resp.status != 200:
            raise ReviewError(f"{where}: HTTP {resp.status} {resp.reason}")
        try:
            labels = json.loads(data)["metadata"].get("labels") or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ReviewError(f"{where}: the answer is not a Node") from None
        if not isinstance(labels, Mapping):
            raise ReviewError(f"{where}: metadata.labels is not a mapping")
        return {str(k): str(v) for k, v in labels.items()}

    def post(self, token: str) -> Review:
        """One TokenReview, synchronously (run it in a thread)."""
        where = f"TokenReview at {self.api.url}"
        try:
            bearer = self.api.token_file.read_text().strip()
        except OSError as e:
            raise ReviewError(
                f"cannot read the controller's own token {self.api.token_file}: {e.strerror}"
            ) from None
        body = json.dumps(
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]},
            }
        ).encode()
        self.requests += 1
        conn = http.client.HTTPSConnection(
            self.api.host, self.api.port, context=self._context(), timeout=self.timeout
        )
        try:
            conn.request(
                "POST",
                TOKENREVIEW_PATH,
                body=body,
                headers={
                    "Authorization": f"Bearer {bearer}",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                    "User-Agent": "tracefleet-controller",
                },
            )
            resp = conn.getresponse()
            data = resp.read(MAX_RESPONSE_BYTES)
        except (OSError, http.client.HTTPException) as e:  # ssl.SSLError, timeouts: OSError
            raise ReviewError(f"{where}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        if resp.status in (401, 403):
            raise ReviewError(
                f"{where}: HTTP {resp.status}: the controller's ServiceAccount may not create "
                "tokenreviews (apply ClusterRole tracefleet-controller, "
                "deploy/kubernetes/controller/rbac.yaml)"
            )
        if resp.status not in (200, 201):
            snippet = data[:200].decode("utf-8", "replace").replace("\n", " ")
            raise ReviewError(f"{where}: HTTP {resp.status} {resp.reason}: {snippet}")
        try:
            doc = json.loads(data)
        except ValueError:
            raise ReviewError(f"{where}: the answer is not JSON") from None
        return Review.from_json(doc)


class AgentTokenVerifier:
    """Decide whether a token proves that its bearer is the agent of node N."""

    def __init__(self, reviewer: TokenReviewer, *, username: str) -> None:
        self.reviewer = reviewer
        self.audience = reviewer.audience
        self.username = username
        self._labels: OrderedDict[str, tuple[float, dict[str, str]]] = OrderedDict()

    async def node_labels(self, node: str) -> dict[str, str]:
        """The labels of Node ``node`` (cached ``cache_seconds``); ReviewError if unread."""
        hit = self._labels.get(node)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return dict(hit[1])
        labels = await asyncio.to_thread(self.reviewer.get_node_labels, node)
        self._labels[node] = (now + self.reviewer.cache_seconds, labels)
        while len(self._labels) > self.reviewer.max_cached:
            self._labels.popitem(last=False)
        return dict(labels)

    async def verify(self, token: str | None, node: str) -> tuple[str, str]:
        """("", "") if accepted, else (reason, one-line message) with reason one of
        TOKEN_REASONS."""
        if not token:
            return (
                "token_missing",
                f"node {node!r}: no ServiceAccount token (the agent sends its projected token "
                "from --token-file / TRACEFLEET_AGENT_TOKEN_FILE as 'authorization: Bearer')",
            )
        if len(token) > MAX_TOKEN_BYTES:
            return "token_unauthenticated", f"node {node!r}: token longer than {MAX_TOKEN_BYTES}"
        try:
            r = await self.reviewer.review(token)
        except ReviewError as e:
            return (
                "token_review_failed",
                f"node {node!r}: cannot verify its ServiceAccount token, so refusing it (fail "
                f"closed): {e}",
            )
        if not r.authenticated:
            why = f": {r.error}" if r.error else ""
            return (
                "token_unauthenticated",
                f"node {node!r}: the API server did not authenticate its token{why}",
            )
        if self.audience not in r.audiences:
            return (
                "token_audience",
                f"node {node!r}: token is not for audience {self.audience!r} (API server "
                f"returned {list(r.audiences)}); mount a projected token with audience "
                f"{self.audience!r}",
            )
        if r.username != self.username:
            return (
                "token_service_account",
                f"node {node!r}: token of {r.username or '?'}, not of {self.username}",
            )
        nodes = r.extra.get(NODE_NAME_KEY, ())
        pod = ",".join(r.extra.get(POD_NAME_KEY, ())) or "?"
        if not nodes:
            return (
                "token_no_node",
                f"node {node!r}: token (pod {pod}) names no node: it must be a pod-bound "
                "projected token, on Kubernetes >= 1.30 with ServiceAccountTokenPodNodeInfo",
            )
        if tuple(nodes) != (node,):
            return (
                "token_node_mismatch",
                f"registers as node {node!r} but its token was issued to pod {pod} on node "
                f"{', '.join(nodes)}",
            )
        return "", ""


TOKEN_REASONS = (
    "token_missing",
    "token_review_failed",
    "token_unauthenticated",
    "token_audience",
    "token_service_account",
    "token_no_node",
    "token_node_mismatch",
    "node_read_failed",
)
