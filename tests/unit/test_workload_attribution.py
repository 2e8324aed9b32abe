"""Workload attribution without root: cgroup path layouts, pod objects, label selectors,
and the workload fields through the event model (JSON, protobuf, table)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.fake_kube_api import AGENT_API_TOKEN, FakeAPIServer
from tests.loadgen import SyntheticEngine
from tracefleet.agent.capture.workload import (
    KubeConfig,
    Pod,
    PodWatcher,
    WorkloadSelector,
    parse_cgroup_path,
    parse_label_selector,
    pod_from_json,
)
from tracefleet.model import Event, human, wire

CID = "0123456789abcdef" * 4
UID = "5f1c2a1e-8b8e-4d6b-9d35-0c2f1c7a9e10"


@pytest.mark.parametrize(
    ("path", "runtime", "uid"),
    [
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
         f"{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope", "containerd", UID),
        (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope",
         "cri-o", UID),  # guaranteed QoS: no QoS slice
        (f"/kubepods/besteffort/pod{UID}/{CID}", "cri", UID),  # cgroupfs driver
        (f"/kubepods/pod{UID}/{CID}/nested/child", "cri", UID),  # a cgroup inside it
        (f"/system.slice/docker-{CID}.scope", "docker", ""),
        (f"/docker/{CID}", "docker", ""),
    ],
)  # fmt: skip
def test_container_layouts(path: str, runtime: str, uid: str) -> None:
    info = parse_cgroup_path(path)
    assert (info.runtime, info.container_id, info.pod_uid) == (runtime, CID, uid)


@pytest.mark.parametrize(
    "path",
    ["/", "/user.slice/user-0.slice/session-3.scope", "/system.slice/ssh.service",
     f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice",  # the pod, not a container
     f"/system.slice/crio-conmon-{CID}.scope", f"/mine/{CID}"],
)  # fmt: skip
def test_outside_containers(path: str) -> None:
    info = parse_cgroup_path(path)
    assert (info.container_id, info.pod_uid) == ("", "")


def test_pod_from_api_object() -> None:
    pod = pod_from_json({
        "metadata": {"uid": UID, "name": "db-0", "namespace": "prod", "labels": {"app": "db"}},
        "status": {"containerStatuses": [{"name": "pg", "containerID": f"containerd://{CID}"},
                                         {"name": "waiting"}]},
    })  # fmt: skip
    assert pod == Pod(UID, "db-0", "prod", {"app": "db"}, {CID: "pg"})


def test_selector_matching() -> None:
    pod = Pod(UID, "db-0", "prod", {"app": "db", "tier": "data"})
    assert WorkloadSelector("prod", "db-*").matches(pod, "pg")
    assert not WorkloadSelector("dev", "db-*").matches(pod, "pg")
    assert not WorkloadSelector(pod="web-*").matches(pod, "pg")
    assert not WorkloadSelector(container="other").matches(pod, "pg")
    assert WorkloadSelector(labels="app=db,tier!=cache,!gone,tier").matches(pod, "pg")
    assert not WorkloadSelector(labels="app=web").matches(pod, "pg")
    assert not WorkloadSelector()
    with pytest.raises(ValueError, match="bad label selector term '=x'"):
        parse_label_selector("app=db,=x")


def test_workload_fields_through_json_protobuf_and_table() -> None:
    e = Event(ts_ns=1, event_set="file", syscall="openat", pid=7, tid=7, comm="postgres",
              ret=3, attribution="pod", container_id=CID, pod="db-0", namespace="prod",
              pod_uid=UID, container="pg")  # fmt: skip
    j = e.to_json()
    got = (j["attribution"], j["pod"], j["namespace"], j["container"])
    assert got == ("pod", "db-0", "prod", "pg")
    assert Event.from_json(j) == e
    assert wire.event_from_pb(wire.event_to_pb(e)) == e
    assert "NAMESPACE" in human.header(workload=True)
    cols = human.line(e, workload=True).split()
    assert cols[1:4] == ["prod", "db-0", "pg"]
    host = Event(ts_ns=1, event_set="file", syscall="openat", pid=7, tid=7, comm="sh", ret=0,
                 attribution="host")  # fmt: skip
    assert human.line(host, workload=True).split()[1:4] == ["-", "(host)", "-"]
    # an event without attribution keeps the old JSON shape
    assert "attribution" not in Event(ts_ns=1, event_set="f", syscall="x", pid=1, tid=1,
                                      comm="c", ret=0).to_json()  # fmt: skip


def test_unknown_attribution_is_counted_and_exposed() -> None:
    """A cgroup not walked yet: the event goes out as unknown, counted per cause, and the
    resolver is woken; /metrics shows the count."""
    from tracefleet.agent.capture.workload import Attributor, CgroupCache
    from tracefleet.agent.metrics import AgentCollector

    att = Attributor(node="n1", cgroups=CgroupCache(root=""))
    ev = {"cgroup_id": 12345}
    att.annotate(ev)
    assert (ev["attribution"], ev["container_id"], ev["node"]) == ("unknown", "", "n1")
    assert att.unknown["cgroup"] == 1 and att._wake.is_set()

    class AttributingEngine(SyntheticEngine):  # BpfEngine hands over its attributor's counts
        def attribution_unknown(self) -> Mapping[str, int]:
            return att.unknown

    fam = {f.name: f for f in AgentCollector(AttributingEngine(0), "n1").collect()}
    got = {s.labels["cause"]: s.value for s in fam["tracefleet_agent_attribution_unknown"].samples
           if s.name.endswith("_total")}  # fmt: skip
    assert got == {"cgroup": 1, "pod": 0, "container-name": 0}


def test_pod_watcher_close_ends_a_blocked_watch(tmp_path: Path) -> None:
    """The agent stops its pod watch at once: close() ends the thread blocked reading a
    watch that has nothing to say (it used to wait out its 10 s join, for every capture)."""
    fake = FakeAPIServer(tmp_path / "api")
    creds = tmp_path / "sa"
    creds.mkdir()
    (creds / "token").write_text(AGENT_API_TOKEN)
    cfg = KubeConfig(server=fake.url, token_file=str(creds / "token"),
                     ca_file=str(fake.ca), node="n1")  # fmt: skip
    w = PodWatcher(cfg)
    try:
        w.start()
        assert w.synced.wait(30), w.last_error
        wait_until(lambda: any("watch=1" in q for q in fake.pod_queries), 30, "the watch")
        w.close()
        assert w._thread is not None and not w._thread.is_alive()
        assert not w.errors, w.errors  # a stop is not an API error
    finally:
        w.close()
        fake.stop()
