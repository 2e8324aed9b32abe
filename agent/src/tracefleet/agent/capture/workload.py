"""Workload identity: which container, pod and namespace an event's cgroup belongs to, and
which cgroups a workload selector (namespace, pod glob, container, labels) names.

cgroup id -> cgroup path: on cgroup v2 a cgroup's id (``bpf_get_current_cgroup_id``) is the
inode number of its directory, so one walk of the cgroup2 mount maps every id to its path.
The walk is bounded (``max_cgroups``), replaces the previous map (what is gone is dropped)
and runs on the resolver thread, never on the event path: an id not known yet is sent with
what is known (``attribution: unknown``), counted, and wakes the resolver.

path -> container id and pod UID: the layouts of containerd (``cri-containerd-<id>.scope``),
CRI-O (``crio-<id>.scope``), Docker (``docker-<id>.scope``) under systemd, and the cgroupfs
driver (``kubepods/burstable/pod<uid>/<id>``, ``docker/<id>``).

pod UID -> name, namespace, labels, container names: the API server's pods of this node only
(``fieldSelector=spec.nodeName=<node>``: list, then watch), over stdlib HTTPS with the
pod's ServiceAccount credentials. A DaemonSet's pod already has those, and one watch per node
is what kubelet itself does; the CRI socket would need a gRPC client of the runtime's API and
a hostPath mount of a root-owned socket that also allows creating containers.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

# one selector type and one label-selector syntax for agent and controller (the model's)
from tracefleet.model.filters import WorkloadSelector as WorkloadSelector
from tracefleet.model.filters import parse_label_selector as parse_label_selector

if TYPE_CHECKING:  # imported where used: only a pod watcher needs HTTPS (~70 ms of start-up)
    import http.client

log = logging.getLogger("tracefleet.agent.workload")

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CGROUP_ROOT_ENV = "TRACEFLEET_CGROUP_ROOT"  # tracefleet.agent.env.CGROUP_ROOT
MAX_CGROUPS = 65536  # a node with more cgroups than this is truncated, counted and logged
MAX_RESPONSE_LINE = 4 << 20  # one watch event (a pod object) larger than this is refused

# attribution of an event
HOST = "host"  # the process is in no container
CONTAINER = "container"  # a container id, no pod metadata (not on Kubernetes, or not yet)
POD = "pod"  # container id and its pod's metadata
UNKNOWN = "unknown"  # the cgroup id is not resolved yet (or is gone)

_ID = r"([0-9a-f]{64})"
_SCOPE = re.compile(r"^(cri-containerd|crio|docker)-" + _ID + r"\.scope$")
_POD_SLICE = re.compile(r"^kubepods(?:-[a-z]+)?-pod([0-9a-f_]{36})\.slice$")
_POD_DIR = re.compile(r"^pod([0-9a-f-]{36})$")
_BARE_ID = re.compile(r"^" + _ID + r"$")
_RUNTIME = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker"}


@dataclass(frozen=True)
class CgroupInfo:
    """What a cgroup path says: runtime and container id ("" outside containers), pod UID
    ("" outside Kubernetes pods)."""

    path: str
    runtime: str = ""
    container_id: str = ""
    pod_uid: str = ""


def parse_cgroup_path(path: str) -> CgroupInfo:
    """Container and pod of a cgroup path (relative to the cgroup2 root). The outermost
    container component wins: cgroups nested inside a container belong to it."""
    runtime = cid = uid = ""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if m := _POD_SLICE.match(part):
            uid = m.group(1).replace("_", "-")
        elif (m := _POD_DIR.match(part)) and i > 0 and parts[0] == "kubepods":
            uid = m.group(1)
        elif m := _SCOPE.match(part):
            runtime, cid = _RUNTIME[m.group(1)], m.group(2)
            break
        elif (m := _BARE_ID.match(part)) and i > 0 and parts[0] in ("kubepods", "docker"):
            runtime, cid = ("docker" if parts[0] == "docker" else "cri"), m.group(1)
            break
    return CgroupInfo(path="/" + "/".join(parts), runtime=runtime, container_id=cid,
                      pod_uid=uid if cid else "")  # fmt: skip


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> str:
    """Mount point of the cgroup2 hierarchy (``/sys/fs/cgroup``, or ``.../unified`` on a
    hybrid host); "" when there is none."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split(" ")[4].replace("\\040", " ")
    except OSError:
        pass
    return ""


class CgroupCache:
    """cgroup id -> path of this host's cgroup2 hierarchy; get() is a dict read, refresh()
    walks (the resolver thread's job)."""

    def __init__(self, root: str | None = None, max_cgroups: int = MAX_CGROUPS) -> None:
        self.root = cgroup2_root() if root is None else root
        self.max_cgroups = max_cgroups
        self._paths: dict[int, CgroupInfo] = {}
        self.walks = 0
        self.truncated = False

    def get(self, cgroup_id: int) -> CgroupInfo | None:
        return self._paths.get(cgroup_id)

    def items(self) -> list[tuple[int, CgroupInfo]]:
        return list(self._paths.items())

    def refresh(self) -> None:
        if not self.root:
            return
        new: dict[int, CgroupInfo] = {}
        stack = [""]
        truncated = False
        while stack:
            rel = stack.pop()
            try:
                with os.scandir(self.root + rel) as it:
                    entries = [e for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:  # removed during the walk
                continue
            for e in entries:
                if len(new) >= self.max_cgroups:
                    truncated = True
                    break
                sub = f"{rel}/{e.name}"
                try:
                    ino = e.inode()
                except OSError:
                    continue
                old = self._paths.get(ino)
                new[ino] = old if old is not None and old.path == sub else parse_cgroup_path(sub)
                stack.append(sub)
        with contextlib.suppress(OSError):
            new[os.stat(self.root).st_ino] = CgroupInfo(path="/")
        if truncated and not self.truncated:
            log.warning("more than %d cgroups: the rest are not attributed", self.max_cgroups)
        self.truncated = truncated
        self._paths = new  # one reference swap: readers see the old map or the new one
        self.walks += 1


# ---- pods ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    uid: str
    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    containers: Mapping[str, str] = field(default_factory=dict)  # container id -> name


def pod_from_json(obj: Mapping[str, Any]) -> Pod:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    containers: dict[str, str] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or ():
            cid = str(cs.get("containerID") or "")
            if "://" in cid:  # containerd://<id>, cri-o://<id>, docker://<id>
                containers[cid.split("://", 1)[1]] = str(cs.get("name", ""))
    return Pod(uid=str(meta.get("uid", "")), name=str(meta.get("name", "")),
               namespace=str(meta.get("namespace", "")),
               labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
               containers=containers)  # fmt: skip


class PodSourceError(Exception):
    """The pod metadata source cannot be configured; one line naming the fix."""


@dataclass(frozen=True)
class KubeConfig:
    server: str  # https://host:port
    token_file: str
    ca_file: str
    node: str

    @classmethod
    def from_env(cls, node: str, server: str = "", sa_dir: str = SERVICEACCOUNT_DIR) -> KubeConfig:
        """In-cluster credentials (the ServiceAccount mount and KUBERNETES_SERVICE_HOST), or
        ``server`` with the same mount."""
        if not server:
            host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise PodSourceError("pod metadata needs the API server: run in a pod (the "
                                     "KUBERNETES_SERVICE_HOST variable), or pass --kube-api "
                                     "https://HOST:PORT")  # fmt: skip
            server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        if urlsplit(server).scheme != "https":
            raise PodSourceError(f"--kube-api {server!r}: use https://HOST:PORT")
        token, ca = os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt")
        for p in (token, ca):
            if not os.path.isfile(p):
                raise PodSourceError(f"{p} is missing: mount the ServiceAccount token "
                                     "(automountServiceAccountToken) or pass "
                                     "--kube-credentials DIR")  # fmt: skip
        if not node:
            raise PodSourceError("pod metadata needs this node's name: pass --node or set "
                                 "NODE_NAME (the downward API's spec.nodeName)")  # fmt: skip
        return cls(server=server.rstrip("/"), token_file=token, ca_file=ca, node=node)


class PodWatcher:
    """This node's pods from the API server: list, then watch from the list's
    resourceVersion; on any failure (or a 410 Gone), list again after a back-off. Pods that
    are deleted, or missing from a fresh list, are dropped."""

    def __init__(self, cfg: KubeConfig, on_change: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self._pods: dict[str, Pod] = {}
        self.synced = threading.Event()  # the first list has been applied
        self.errors: collections.Counter[str] = collections.Counter()
        self.last_error = ""
        self._stop = threading.Event()
        # the socket of the request in flight: http.client drops its own reference once a
        # response that closes the connection (a watch) has begun, so close() keeps this one
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def get(self, uid: str) -> Pod | None:
        return self._pods.get(uid)

    def pods(self) -> list[Pod]:
        return list(self._pods.values())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tf-pods", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # unblock a watch read (below TLS: any thread)
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        if self._thread:
            self._thread.join(timeout=10)

    def _path(self, **params: str) -> str:
        sel = quote(f"spec.nodeName={self.cfg.node}", safe="")
        extra = "".join(f"&{k}={quote(v, safe='')}" for k, v in params.items())
        return f"/api/v1/pods?fieldSelector={sel}{extra}"

    def _request(self, path: str, timeout: float) -> http.client.HTTPResponse:
        import http.client
        import ssl

        u = urlsplit(self.cfg.server)
        ctx = ssl.create_default_context(cafile=self.cfg.ca_file)
        with open(self.cfg.token_file) as f:  # kubelet rotates it: read per request
            token = f.read().strip()
        conn = http.client.HTTPSConnection(u.hostname or "", u.port or 443, context=ctx,
                                           timeout=timeout)  # fmt: skip
        conn.connect()
        self._sock = conn.sock
        if self._stop.is_set():  # closed while connecting: close() saw no socket
            conn.close()
            raise OSError("pod watcher closed")
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}",
                                           "Accept": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        if resp.status != 200:
            body = resp.read(512).decode(errors="replace")
            conn.close()
            raise OSError(f"API server answered {resp.status} to GET {path}: {body}")
        return resp

    def _list(self) -> str:
        resp = self._request(self._path(), timeout=30)
        try:
            doc = json.loads(resp.read(64 << 20))
        finally:
            resp.close()
        pods = {}
        for item in doc.get("items") or ():
            p = pod_from_json(item)
            if p.uid:
                pods[p.uid] = p
        self._pods = pods
        self.synced.set()
        self.on_change()
        return str((doc.get("metadata") or {}).get("resourceVersion", ""))

    def _watch(self, rv: str) -> None:
        resp = self._request(self._path(watch="1", resourceVersion=rv,
                                        allowWatchBookmarks="true", timeoutSeconds="300"),
                             timeout=330)  # fmt: skip
        try:
            while not self._stop.is_set():
                line = resp.readline(MAX_RESPONSE_LINE)
                if not line:
                    return
                ev = json.loads(line)
                kind, obj = ev.get("type"), ev.get("object") or {}
                if kind == "ERROR":  # 410 Gone: the resourceVersion is too old; relist
                    raise OSError(f"watch error: {obj.get('message', obj)}")
                if kind == "BOOKMARK":
                    continue
                p = pod_from_json(obj)
                pods = dict(self._pods)
                if kind == "DELETED":
                    pods.pop(p.uid, None)
                elif p.uid:
                    pods[p.uid] = p
                self._pods = pods
                self.on_change()
        finally:
            resp.close()

    def _run(self) -> None:
        import http.client

        backoff = 0.5
        while not self._stop.is_set():
            try:
                rv = self._list()
                backoff = 0.5
                while not self._stop.is_set():
                    self._watch(rv)
                    rv = self._list()  # a watch that ended: relist (drops what went away)
            except (OSError, ValueError, http.client.HTTPException) as e:
                if self._stop.is_set():
                    return
                self.errors[type(e).__name__] += 1
                if str(e) != self.last_error:
                    log.warning("pod metadata: %s (retrying)", e)
                self.last_error = str(e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)


# ---- the resolver ----------------------------------------------------------------------


class Attributor:
    """Annotates events (``annotate``, on the consumer thread: dict reads only) and keeps
    the cgroup cache and the selectors' cgroup ids current (its own thread)."""

    def __init__(
        self,
        node: str = "",
        cgroups: CgroupCache | None = None,
        pods: PodWatcher | None = None,
        rescan_seconds: float = 30.0,  # a safety net: misses and pod events wake it at once
    ) -> None:
        self.node = node
        self.cgroups = cgroups or CgroupCache()
        self.pods = pods
        if pods is not None:
            pods.on_change = self.wake
        self.rescan_seconds = rescan_seconds
        # events sent without full metadata, per cause (metric
        # tracefleet_agent_attribution_unknown_total)
        self.unknown: collections.Counter[str] = collections.Counter()
        self._listeners: list[Callable[[], None]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.generation = 0  # refreshes done; tests wait on it

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Called on the resolver thread after each refresh (the engine resyncs its map)."""
        self._listeners.append(fn)

    def start(self) -> None:
        self.refresh()
        if self.pods is not None:
            self.pods.start()
        self._thread = threading.Thread(target=self._run, name="tf-workload", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.pods is not None:
            self.pods.close()
        if self._thread:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def refresh(self) -> None:
        self.cgroups.refresh()
        for fn in self._listeners:
            try:
                fn()
            except Exception as e:  # a listener's failure must not end attribution
                log.warning("workload listener failed: %s", e)
        self.generation += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.rescan_seconds)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.refresh()
            except Exception as e:
                self.unknown["resolver-error"] += 1
                log.warning("cgroup walk failed: %s", e)
            self._stop.wait(0.05)  # a storm of misses walks at most 20 times a second

    def identity(self, cgroup_id: int) -> dict[str, str]:
        """The workload fields for one cgroup id, from what is known now."""
        out, missing = self._identity(cgroup_id)
        if missing:
            self.unknown[missing] += 1
            if missing == "cgroup":
                self._wake.set()
        return out

    def settled_identity(self, cgroup_id: int) -> dict[str, str] | None:
        """identity() when nothing in it is still unknown (it would count nothing), else
        None: what may be kept for the cgroup's next events until the next refresh."""
        out, missing = self._identity(cgroup_id)
        return None if missing else out

    def _identity(self, cgroup_id: int) -> tuple[dict[str, str], str]:
        """(the workload fields, what is not known: "" or the unknown counter's key)"""
        out = {"attribution": UNKNOWN, "container_id": "", "pod": "", "namespace": "",
               "pod_uid": "", "container": ""}  # fmt: skip
        if self.node:
            out["node"] = self.node
        info = self.cgroups.get(cgroup_id)
        if info is None:
            return out, "cgroup"
        if not info.container_id:
            out["attribution"] = HOST
            return out, ""
        out["attribution"] = CONTAINER
        out["container_id"] = info.container_id
        out["pod_uid"] = info.pod_uid
        if self.pods is None or not info.pod_uid:
            return out, ""
        pod = self.pods.get(info.pod_uid)
        if pod is None:
            return out, "pod"
        out.update(attribution=POD, pod=pod.name, namespace=pod.namespace,
                   container=pod.containers.get(info.container_id, ""))  # fmt: skip
        return out, "" if out["container"] else "container-name"

    def namespace_of(self, cgroup_id: int) -> str:
        """The namespace of the pod a cgroup belongs to; "" when not (yet) known."""
        info = self.cgroups.get(cgroup_id)
        if info is None or not info.pod_uid or self.pods is None:
            return ""
        pod = self.pods.get(info.pod_uid)
        return pod.namespace if pod is not None else ""

    def annotate(self, ev: dict[str, Any]) -> None:
        ev.update(self.identity(int(ev.get("cgroup_id") or 0)))

    def resolve(self, sel: WorkloadSelector) -> set[int]:
        """cgroup ids of the containers ``sel`` names, from what is known now."""
        out: set[int] = set()
        for cg, info in self.cgroups.items():
            if not info.container_id:
                continue
            pod = self.pods.get(info.pod_uid) if self.pods is not None else None
            if pod is None:
                continue
            if sel.matches(pod, pod.containers.get(info.container_id, "")):
                out.add(cg)
        return out


# ---- command line ----------------------------------------------------------------------


def add_filter_flags(sp: argparse.ArgumentParser) -> None:
    """--namespace/--pod/--container/-l and --follow, beside --pid/--comm."""
    sp.add_argument("--namespace", default="", help="only pods of this namespace")
    sp.add_argument("--pod", default="", metavar="GLOB", help="only pods named so (db-*)")
    sp.add_argument("--container", default="", help="only containers of this name")
    sp.add_argument("-l", "--selector", default="", metavar="LABELS",
                    help="only pods with these labels (app=db,tier!=cache)")  # fmt: skip
    sp.add_argument(
        "--follow",
        action="store_true",
        help="--pid also covers its descendants, present and future (strace -f)",
    )


def add_source_flags(sp: argparse.ArgumentParser) -> None:
    """Where pod metadata comes from."""
    sp.add_argument(
        "--kube-api",
        default="",
        metavar="URL",
        help="API server for pod metadata (default: in-cluster, when in a pod)",
    )
    sp.add_argument(
        "--kube-credentials",
        default=SERVICEACCOUNT_DIR,
        metavar="DIR",
        help="directory with token and ca.crt (default: %(default)s)",
    )
    sp.add_argument(
        "--metrics-namespaces",
        type=int,
        default=0,
        metavar="N",
        help="count events per namespace on /metrics for at most N namespaces, the rest as "
        "_other (default: 0, off; pod names and UIDs are never labels)",
    )
    sp.add_argument(
        "--cgroup-root",
        default=os.environ.get(CGROUP_ROOT_ENV, ""),
        metavar="DIR",
        help=f"the host's cgroup2 mount (env {CGROUP_ROOT_ENV}; default: the cgroup2 "
        "mount this process sees)",
    )


def selector_from_args(args: argparse.Namespace) -> WorkloadSelector:
    sel = WorkloadSelector(namespace=args.namespace, pod=args.pod, container=args.container,
                           labels=args.selector)  # fmt: skip
    sel.check()
    return sel


def attributor_from_args(args: argparse.Namespace, node: str, need_pods: bool) -> Attributor:
    """Cgroup attribution always; pod metadata with --kube-api, in a pod, or when a workload
    filter needs it (PodSourceError naming the fix if it cannot be had)."""
    pods = None
    if args.kube_api or need_pods or os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = KubeConfig.from_env(node, args.kube_api, args.kube_credentials)
        pods = PodWatcher(cfg)
    root = getattr(args, "cgroup_root", "") or None
    if root is not None and not os.path.isfile(os.path.join(root, "cgroup.procs")):
        raise PodSourceError(f"--cgroup-root {root}: not a cgroup2 mount (no cgroup.procs); "
                             "mount the host's /sys/fs/cgroup there")  # fmt: skip
    return Attributor(node=node, cgroups=CgroupCache(root), pods=pods)
