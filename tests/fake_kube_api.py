"""A fake Kubernetes API server (a stand-in with the real API's shape, not kube-apiserver):
a stdlib HTTPS server with its own CA, in the test process, answering the way kube-apiserver
does. TokenReview and Node reads for the tests of ``--agent-identity=k8s-token``; Pod list
and watch (``fieldSelector=spec.nodeName=``, resourceVersion, ADDED/MODIFIED/DELETED) for
the agent's workload attribution."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tracefleet.controller.common import certs

AUDIENCE = "tracefleet"
AGENT_USER = "system:serviceaccount:tracefleet:tracefleet-agent"
CONTROLLER_API_TOKEN = "controller-own-token"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
AGENT_API_TOKEN = "agent-own-token"  # the agent's ServiceAccount token (pods of its node)


def jwt(name: str, exp_in: float = 600) -> str:
    """A token shaped like a JWT (the controller reads only ``exp``, to bound its cache)."""

    def b64(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return f"{b64({'alg': 'RS256'})}.{b64({'exp': int(time.time() + exp_in), 'n': name})}.sig"


class FakeAPIServer:
    """POST /apis/authentication.k8s.io/v1/tokenreviews over HTTPS, like kube-apiserver:
    requires the controller's bearer token (else 401), answers 201 with a TokenReview whose
    status.audiences is the intersection of spec.audiences and the token's audiences, and
    does not authenticate a token of another audience. ``unaware`` tokens are answered like
    an authenticator that ignores spec.audiences (authenticated, with the token's own
    audiences), to exercise the controller's own audience check."""

    def __init__(self, d: Path) -> None:
        certs.init_ca(d)
        certs.issue(d, d / "server", common_name="kube-apiserver", unit="apiserver",
                    ips=["127.0.0.1"], server=True)  # fmt: skip
        self.ca = d / "ca.crt"
        self.tokens: dict[str, dict[str, Any]] = {}
        self.reviews: list[dict[str, Any]] = []  # request bodies received
        self.auth_headers: list[str] = []
        self.forced: tuple[int, bytes] | None = None  # answer this (status, body) instead
        self.node_labels: dict[str, dict[str, str]] = {}  # GET /api/v1/nodes/NAME
        self.node_reads = 0
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> Pod object
        self.pod_events: list[tuple[int, str, dict[str, Any]]] = []  # (rv, type, Pod)
        self.pod_queries: list[str] = []  # request paths of pod lists and watches
        self.rv = 100
        self.cond = threading.Condition()
        self.stopping = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.auth_headers.append(self.headers.get("Authorization", ""))
                if fake.forced is not None:
                    return self._raw(*fake.forced)
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    return self._send(404, {"kind": "Status", "code": 404})
                if self.headers.get("Authorization") != f"Bearer {CONTROLLER_API_TOKEN}":
                    return self._send(401, {"kind": "Status", "code": 401})
                fake.reviews.append(body)
                self._send(201, {**body, "status": fake.status(body["spec"])})

            def do_GET(self) -> None:
                if self.path.startswith("/api/v1/pods"):
                    return self._pods()
                if self.headers.get("Authorization") != f"Bearer {CONTROLLER_API_TOKEN}":
                    return self._send(401, {"kind": "Status", "code": 401})
                name = self.path.removeprefix("/api/v1/nodes/")
                if name == self.path or name not in fake.node_labels:
                    return self._send(404, {"kind": "Status", "code": 404})
                fake.node_reads += 1
                meta = {"name": name, "labels": fake.node_labels[name]}
                self._send(200, {"kind": "Node", "apiVersion": "v1", "metadata": meta})

            def _pods(self) -> None:
                if self.headers.get("Authorization") != f"Bearer {AGENT_API_TOKEN}":
                    return self._send(401, {"kind": "Status", "code": 401})
                fake.pod_queries.append(self.path)
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                node = (q.get("fieldSelector") or [""])[0].removeprefix("spec.nodeName=")

                def mine(pod: dict[str, Any]) -> bool:
                    return not node or pod["spec"].get("nodeName") == node

                if (q.get("watch") or [""])[0] not in ("1", "true"):
                    with fake.cond:
                        items = [p for p in fake.pods.values() if mine(p)]
                        rv = fake.rv
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1",
                                            "metadata": {"resourceVersion": str(rv)},
                                            "items": items})  # fmt: skip
                since = int((q.get("resourceVersion") or ["0"])[0] or 0)
                end = time.monotonic() + int((q.get("timeoutSeconds") or ["300"])[0])
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                while time.monotonic() < end:
                    with fake.cond:
                        fake.cond.wait_for(lambda s=since: fake.stopping or any(
                            rv > s for rv, *_ in fake.pod_events), timeout=0.5)  # fmt: skip
                        if fake.stopping:
                            return
                        new = [e for e in fake.pod_events if e[0] > since]
                    for rv, kind, obj in new:
                        since = rv
                        if mine(obj):
                            line = json.dumps({"type": kind, "object": obj}) + "\n"
                            self.wfile.write(line.encode())
                    self.wfile.flush()

            def _send(self, code: int, doc: dict[str, Any]) -> None:
                self._raw(code, json.dumps(doc).encode())

            def _raw(self, code: int, data: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(d / "server" / "tls.crt", d / "server" / "tls.key")
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def status(self, spec: dict[str, Any]) -> dict[str, Any]:
        t = self.tokens.get(spec["token"])
        if t is None:
            return {"authenticated": False, "user": {},
                    "error": "[invalid bearer token, square/go-jose: error in cryptographic "
                             "primitive]"}  # fmt: skip
        wanted = spec.get("audiences") or [API_AUDIENCE]
        common = [a for a in t["aud"] if a in wanted]
        if not common and not t.get("unaware"):
            return {"authenticated": False, "user": {},
                    "error": f"[invalid bearer token, token audiences {t['aud']} is invalid for "
                             f"the target audiences {wanted}]"}  # fmt: skip
        extra = {"authentication.kubernetes.io/pod-name": [f"tracefleet-agent-{t['node']}"],
                 "authentication.kubernetes.io/pod-uid": ["5e0bd49b"]}  # fmt: skip
        if not t.get("no_node"):  # a cluster without ServiceAccountTokenPodNodeInfo has none
            extra["authentication.kubernetes.io/node-name"] = [t["node"]]
            extra["authentication.kubernetes.io/node-uid"] = ["646e7c5e"]
        return {
            "authenticated": True,
            "audiences": t["aud"] if t.get("unaware") else common,
            "user": {"username": t.get("user", AGENT_USER), "uid": "14ee3fa4", "extra": extra,
                     "groups": ["system:serviceaccounts", "system:authenticated"]},
        }  # fmt: skip

    def add(
        self, node: str, *, aud: tuple[str, ...] = (AUDIENCE,), exp_in: float = 600, **kw: Any
    ) -> str:
        token = jwt(f"{node}-{len(self.tokens)}", exp_in)
        self.tokens[token] = {"node": node, "aud": list(aud), **kw}
        self.node_labels.setdefault(node, {})
        return token

    def put_pod(
        self,
        uid: str,
        name: str,
        namespace: str,
        node: str,
        containers: dict[str, str],
        labels: dict[str, str] | None = None,
        runtime: str = "containerd",
    ) -> None:
        """Create or update a Pod (containers: name -> container id), as a watch sees it."""
        with self.cond:
            self.rv += 1
            kind = "MODIFIED" if uid in self.pods else "ADDED"
            pod = {"kind": "Pod", "apiVersion": "v1",
                   "metadata": {"uid": uid, "name": name, "namespace": namespace,
                                "labels": labels or {}, "resourceVersion": str(self.rv)},
                   "spec": {"nodeName": node,
                            "containers": [{"name": n} for n in containers]},
                   "status": {"phase": "Running", "containerStatuses": [
                       {"name": n, "containerID": f"{runtime}://{c}", "ready": True}
                       for n, c in containers.items()]}}  # fmt: skip
            self.pods[uid] = pod
            self.pod_events.append((self.rv, kind, pod))
            self.cond.notify_all()

    def delete_pod(self, uid: str) -> None:
        with self.cond:
            self.rv += 1
            pod = self.pods.pop(uid)
            self.pod_events.append((self.rv, "DELETED", pod))
            self.cond.notify_all()

    def reviews_of(self, token: str) -> int:
        return sum(1 for r in self.reviews if r["spec"]["token"] == token)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
