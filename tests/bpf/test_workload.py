"""Workload identity on the real kernel: cgroup v2 directories made here in the kubelet's
layouts (systemd driver: containerd, CRI-O; Docker under system.slice; a plain cgroup),
real processes moved into them, captured with real BPF. Pod metadata comes from
tests/fake_kube_api.py, a stand-in with the API server's shape (list + watch of this node's
pods), not a real kube-apiserver; no container runtime runs here."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BPF_DIR, scaled, wait_until
from tests.fake_kube_api import AGENT_API_TOKEN, FakeAPIServer
from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
from tracefleet.agent.capture.engine import EventSetConfig, Filters
from tracefleet.agent.capture.workload import (
    Attributor,
    KubeConfig,
    PodWatcher,
    WorkloadSelector,
    cgroup2_root,
)

pytestmark = pytest.mark.bpf

NODE = "wl-node-1"
MISSING = "/proc/tf-workload-missing"  # opened by the workers: ENOENT, never a real file
# the workers' command name (they run python through a symlink of this name): the
# attribution test filters on it in the kernel, so the rest of a busy host cannot fill the
# ring and drop the workers' events
COMM = "tfwl-worker"

_CHILD = r"""
import os, sys
for line in sys.stdin:
    try:
        os.close(os.open(line.strip(), os.O_RDONLY))
    except OSError:
        pass
    print("ok", flush=True)
"""


class Worker:
    """A process in cgroup ``cg`` that opens the paths it is given, one per request."""

    def __init__(self, cg: Path, tag: str, exe: Path) -> None:
        self.tag = tag
        self.n = 0
        self.p = subprocess.Popen([str(exe), "-c", _CHILD], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        (cg / "cgroup.procs").write_text(str(self.p.pid))
        self.cgroup_id = cg.stat().st_ino

    def open(self) -> str:
        self.n += 1
        path = f"{MISSING}/{self.tag}-{self.n}"
        assert self.p.stdin and self.p.stdout
        self.p.stdin.write(path + "\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline() == "ok\n"
        return path

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


class Env:
    def __init__(self, root: Path, fake: FakeAPIServer, creds: Path) -> None:
        self.root = root
        self.fake = fake
        self.creds = creds
        self.dirs: list[Path] = []
        self.workers: list[Worker] = []
        self.exe = creds.parent / COMM
        self.exe.symlink_to(sys.executable)

    def mkdir(self, rel: str) -> Path:
        d = self.root
        for part in rel.split("/"):
            d = d / part
            if not d.exists():
                d.mkdir()
                self.dirs.append(d)
        return d

    def pod(
        self, runtime: str, ns: str, name: str, container: str, labels=None, publish: bool = True
    ) -> Worker:
        """A pod with one container: its cgroups in the kubelet's systemd layout, the Pod in
        the stand-in API (later, by ``w.publish()``, when ``publish`` is false), and a worker
        process in the container's cgroup."""
        uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
        qos = "kubepods.slice/kubepods-burstable.slice"
        prefix = {"containerd": "cri-containerd", "cri-o": "crio"}[runtime]
        slice_ = f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
        w = self.worker(f"{qos}/{slice_}/{prefix}-{cid}.scope", f"{ns}-{name}")
        w.expect = {"attribution": "pod", "container_id": cid, "pod": name, "namespace": ns,
                    "pod_uid": uid, "container": container, "node": NODE}  # type: ignore[attr-defined]  # fmt: skip
        w.uid = uid  # type: ignore[attr-defined]
        w.publish = lambda: self.fake.put_pod(  # type: ignore[attr-defined]
            uid, name, ns, NODE, {container: cid}, labels, runtime
        )
        if publish:
            w.publish()  # type: ignore[attr-defined]
        return w

    def worker(self, rel: str, tag: str) -> Worker:
        w = Worker(self.mkdir(rel), tag, self.exe)
        self.workers.append(w)
        return w

    def cleanup(self) -> None:
        for w in self.workers:
            w.stop()
        for d in reversed(self.dirs):
            _rmdir(d)


def _rmdir(d: Path) -> None:
    """A cgroup can stay busy for a moment after its last task was reaped."""

    def gone() -> bool:
        try:
            d.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    wait_until(gone, scaled(10), f"rmdir {d}")


@pytest.fixture
def env(host: None, tmp_path: Path) -> Iterator[Env]:
    base = cgroup2_root()
    if not base:
        pytest.fail("no cgroup2 hierarchy mounted: attribution needs cgroup v2")
    fake = FakeAPIServer(tmp_path / "api")
    creds = tmp_path / "sa"
    creds.mkdir()
    (creds / "token").write_text(AGENT_API_TOKEN)
    (creds / "ca.crt").write_bytes(fake.ca.read_bytes())
    root = Path(base) / f"tf-test-{os.getpid()}-{secrets.token_hex(3)}.slice"
    root.mkdir()
    e = Env(root, fake, creds)
    try:
        yield e
    finally:
        e.cleanup()
        _rmdir(root)
        fake.stop()


class Capture:
    def __init__(self, env: Env, filters: Filters | None = None, ns_budget: int = 0) -> None:
        filters = filters or Filters()
        cfg = KubeConfig(server=env.fake.url, token_file=str(env.creds / "token"),
                         ca_file=str(env.creds / "ca.crt"), node=NODE)  # fmt: skip
        self.att = Attributor(node=NODE, pods=PodWatcher(cfg))
        opts = EngineOptions(bpf_dir=BPF_DIR, sets=("file",), attributor=self.att,
                             namespace_budget=ns_budget)  # fmt: skip
        self.engine = BpfEngine(opts)
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.engine.add_sink(self._sink)
        self.att.start()
        assert self.att.pods is not None and self.att.pods.synced.wait(scaled(30))
        st = self.engine.apply({"file": EventSetConfig("file", True, filters)})
        assert not st[0].error, st[0].error
        self.engine.start()

    def _sink(self, ev: dict[str, Any]) -> None:
        path = ev["args"].get("pathname", {}).get("value")
        if isinstance(path, str) and path.startswith(MISSING):
            with self.cond:
                self.events.append(ev)
                self.cond.notify_all()

    def of(self, path: str) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.events if e["args"]["pathname"]["value"] == path]

    def wait(self, path: str) -> dict[str, Any]:
        return wait_until(lambda: self.of(path), scaled(20), f"event of {path}")[0]

    def close(self) -> None:
        self.engine.close()
        self.att.close()


def identity(ev: dict[str, Any]) -> dict[str, str]:
    keys = ("attribution", "container_id", "pod", "namespace", "pod_uid", "container", "node")
    return {k: ev.get(k) for k in keys}


def test_events_name_container_pod_namespace(env: Env) -> None:
    db = env.pod("containerd", "prod", "db-0", "postgres")
    web = env.pod("cri-o", "shop", "web-1", "nginx")
    dock_id = secrets.token_hex(32)
    dock = env.worker(f"system.slice/docker-{dock_id}.scope", "docker")
    plain = env.worker("plain.scope", "plain")
    cap = Capture(env, Filters(comms=(COMM,)))
    try:
        for w in (db, web):
            assert identity(cap.wait(w.open())) == w.expect  # type: ignore[attr-defined]
        want_dock = {"attribution": "container", "container_id": dock_id, "pod": "",
                     "namespace": "", "pod_uid": "", "container": "", "node": NODE}  # fmt: skip
        assert identity(cap.wait(dock.open())) == want_dock
        want_host = {"attribution": "host", "container_id": "", "pod": "", "namespace": "",
                     "pod_uid": "", "container": "", "node": NODE}  # fmt: skip
        assert identity(cap.wait(plain.open())) == want_host

        # a container born after the agent's last walk, whose Pod the API does not show yet
        # (the kubelet makes the cgroup before the watch reports the Pod): sent at once with
        # what is known, each partial event counted, then named in full once both are seen
        late = env.pod("containerd", "prod", "late-0", "app", publish=False)
        before = dict(cap.att.unknown)
        partial = []
        ev = None
        while ev is None or ev["attribution"] != "container":
            ev = cap.wait(late.open())
            assert ev["attribution"] in ("unknown", "container"), ev
            partial.append(ev)
        want_partial = dict(late.expect, attribution="container", pod="", namespace="",  # type: ignore[attr-defined]
                            container="")  # fmt: skip
        assert identity(ev) == want_partial
        late.publish()  # type: ignore[attr-defined]
        while ev["attribution"] != "pod":
            ev = cap.wait(late.open())
            assert ev["attribution"] in ("container", "pod"), ev
            partial += [ev] if ev["attribution"] == "container" else []
        assert identity(ev) == late.expect  # type: ignore[attr-defined]
        for cause, attribution in (("cgroup", "unknown"), ("pod", "container")):
            n = sum(e["attribution"] == attribution for e in partial)
            assert cap.att.unknown[cause] - before.get(cause, 0) >= n, (cause, n)
    finally:
        cap.close()


def _ids(cap: Capture, w: Worker) -> set[str]:
    return {e["args"]["pathname"]["value"] for e in cap.events if e["pid"] == w.p.pid}


def test_namespace_and_pod_glob_filter_in_kernel(env: Env) -> None:
    db0 = env.pod("containerd", "prod", "db-0", "postgres", {"app": "db"})
    web = env.pod("cri-o", "prod", "web-0", "nginx", {"app": "web"})
    dev = env.pod("containerd", "dev", "db-0", "postgres", {"app": "db"})
    plain = env.worker("plain.scope", "plain")
    sel = WorkloadSelector(namespace="prod", pod="db-*")
    cap = Capture(env, Filters(workload=sel))
    try:
        eng = cap.engine
        before = eng.kernel_counters("file")["filtered"]
        others = [w.open() for w in (web, dev, plain)]
        first = db0.open()
        assert identity(cap.wait(first)) == db0.expect  # type: ignore[attr-defined]
        # the others ran first and completed: filtered in the kernel, never sent
        assert [identity(e) for p in others for e in cap.of(p)] == []
        assert eng.kernel_counters("file")["filtered"] - before >= len(others)

        # a pod that appears after the rule was set: followed as soon as the agent sees it
        db1 = env.pod("containerd", "prod", "db-1", "postgres", {"app": "db"})
        wait_until(lambda: db1.cgroup_id in eng._cg_written, scaled(20), "db-1 in the map")
        assert identity(cap.wait(db1.open())) == db1.expect  # type: ignore[attr-defined]

        # a pod that goes away: its cgroup leaves the kernel map, its calls stop passing
        env.fake.delete_pod(db0.uid)  # type: ignore[attr-defined]
        wait_until(lambda: db0.cgroup_id not in eng._cg_written, scaled(20), "db-0 removed")
        gone = db0.open()
        sentinel = db1.open()  # after db-0's call returned: the ring holds it in order
        cap.wait(sentinel)
        assert not cap.of(gone)
        assert all(not cap.of(p) for p in others)
    finally:
        cap.close()


def test_label_selector_and_container_filter(env: Env) -> None:
    a = env.pod("containerd", "prod", "api-0", "api", {"app": "api", "tier": "front"})
    b = env.pod("containerd", "prod", "api-1", "sidecar", {"app": "api", "tier": "back"})
    sel = WorkloadSelector(labels="app=api,tier!=back", container="api")
    cap = Capture(env, Filters(workload=sel))
    try:
        skipped = b.open()
        assert identity(cap.wait(a.open())) == a.expect  # type: ignore[attr-defined]
        assert not cap.of(skipped)
    finally:
        cap.close()


def test_namespace_metric_label_is_opt_in_and_bounded(env: Env) -> None:
    from tracefleet.agent.metrics import AgentCollector

    a = env.pod("containerd", "prod", "db-0", "postgres")
    b = env.pod("cri-o", "shop", "web-0", "nginx")
    plain = env.worker("plain.scope", "plain")
    cap = Capture(env, Filters(comms=(COMM,)), ns_budget=1)
    try:
        for w in (a, b, plain):
            cap.wait(w.open())
        counts = dict(cap.engine.namespace_events)
        # one namespace value allowed: the first seen keeps its name, the next is _other
        assert counts.get(("file", "prod"), 0) >= 1
        assert counts.get(("file", "_other"), 0) >= 1
        assert ("file", "shop") not in counts
        assert counts.get(("file", ""), 0) >= 1  # outside pods: not charged to the budget
        fam = {f.name: f for f in AgentCollector(cap.engine, NODE).collect()}
        values = {s.labels["namespace"] for s in fam["tracefleet_agent_namespace_events"].samples
                  if s.name.endswith("_total")}  # fmt: skip
        assert values == {"prod", "_other", ""}
        assert all("pod" not in s.labels for f in fam.values() for s in f.samples)
    finally:
        cap.close()


def test_agent_capture_cli_namespace_and_pod_glob_table(env: Env) -> None:
    """`tracefleet-agent capture -e file --namespace prod --pod 'db-*' -o table` as a user
    runs it (pod metadata from the stand-in via --kube-api): only the db pods of prod, with
    their NAMESPACE/POD/CONTAINER columns."""
    from tests.bpf.test_agent_cli import AGENT

    db = env.pod("containerd", "prod", "db-0", "postgres")
    other = env.pod("containerd", "dev", "db-0", "postgres")
    ready = env.creds.parent / "ready"
    proc = subprocess.Popen(
        [*AGENT, "capture", "-e", "file", "--namespace", "prod", "--pod", "db-*", "-o", "table",
         "--kube-api", env.fake.url, "--kube-credentials", str(env.creds),
         "--duration", str(scaled(10)), "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TRACEFLEET_NODE_NAME": NODE},
    )  # fmt: skip
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, scaled(60), "agent ready")
        skipped, seen = other.open(), db.open()
        out, err = proc.communicate(timeout=scaled(60))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].split()[2:5] == ["NAMESPACE", "POD", "CONTAINER"]
    (line,) = [ln for ln in lines if seen in ln]
    assert line.split()[1:4] == ["prod", "db-0", "postgres"]
    assert not [ln for ln in lines if skipped in ln]
    assert all(ln.split()[1:3] == ["prod", "db-0"] for ln in lines[1:]), lines
