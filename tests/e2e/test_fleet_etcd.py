"""Controller replicas sharing the desired state and the node registry in etcd: a real
3-member etcd cluster on loopback (Debian etcd-server), two controller processes, a simulated
agent on each. A change made through one replica reaches the agent of the other, and
concurrent changes through two stores never issue the same generation. A real agent given
both replicas' addresses moves to the survivor when its replica is SIGKILLed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BPF_DIR, require_root, scaled
from tests.e2e.fleet_helpers import (
    AgentProc,
    ControllerProc,
    cli,
    cli_json,
    free_port,
    nodes_by_name,
    wait_until,
)
from tracefleet.controller.domain.rules import Rule
from tracefleet.controller.storage.etcdstore import EtcdClient, EtcdError, EtcdStore
from tracefleet.controller.storage.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[list[str]]:
    """Client URLs of a fresh 3-member etcd cluster on loopback."""
    etcd = shutil.which("etcd")
    if etcd is None:
        pytest.fail("etcd is not installed (Debian package etcd-server): run make deps")
    ports = [(free_port(), free_port()) for _ in range(3)]
    cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    procs = []
    for i, (client, peer) in enumerate(ports):
        with open(tmp_path / f"etcd{i}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        etcd, "--name", f"m{i}", "--data-dir", str(tmp_path / f"etcd{i}"),
                        "--listen-client-urls", f"http://127.0.0.1:{client}",
                        "--advertise-client-urls", f"http://127.0.0.1:{client}",
                        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                        "--initial-cluster", cluster, "--initial-cluster-state", "new",
                        "--initial-cluster-token", f"tf-{tmp_path.name}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
    urls = [f"http://127.0.0.1:{client}" for client, _ in ports]

    def healthy() -> bool:
        for url in urls:  # every member answers, and a write has its quorum
            try:
                EtcdClient([url], timeout=2).put_if(f"/health/{url}", "ok", 0)
                EtcdClient([url], timeout=2).get(f"/health/{url}")
            except EtcdError:
                return False
        return True

    try:
        wait_until(healthy, scaled(30), "a 3-member etcd cluster")
        yield urls
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _agent(agent: AgentProc) -> dict:
    stats = agent.stats()
    return stats[0] if stats else {}


def test_a_change_through_one_replica_reaches_the_agents_of_the_other(tmp_path, etcd3):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    # each replica talks to its own members: a change crosses the cluster's replication too
    a = ControllerProc(dirs[0], stale_after=10, extra_args=["--etcd", ",".join(etcd3[:2])])
    b = ControllerProc(dirs[1], stale_after=10, extra_args=["--etcd", etcd3[2]])
    a.start()
    b.start()
    on_a = AgentProc(tmp_path, a.address, "on-a", labels="role=db").start()
    on_b = AgentProc(tmp_path, b.address, "on-b", labels="role=db").start()
    try:
        for agent in (on_a, on_b):
            wait_until(lambda ag=agent: _agent(ag).get("connected"), scaled(30), agent.name)
        res = cli_json(a.address, "enable", "file", "--selector", "role=db")
        assert res["matched_nodes"] == ["on-a"]  # A's own agents; B pushes to its own
        gen = res["generation"]
        for agent in (on_a, on_b):
            wait_until(
                lambda ag=agent: (
                    _agent(ag).get("applied_generation") == gen
                    and _agent(ag).get("enabled") == ["file"]
                ),
                scaled(30),
                f"{agent.name} applied generation {gen} with file enabled",
            )
        # the other way, under a later generation
        res2 = cli_json(b.address, "disable", "file")
        assert res2["generation"] > gen
        wait_until(
            lambda: (
                _agent(on_a).get("applied_generation") == res2["generation"]
                and _agent(on_a).get("enabled") == []
            ),
            scaled(30),
            "on-a applied the disable made through replica B",
        )
        # both replicas' nodes are in etcd's registry (saved within a flush period)
        store = EtcdStore(EtcdClient(etcd3), "/tracefleet", Store(":memory:"))
        wait_until(
            lambda: {"on-a", "on-b"} <= {r.name for r in store.nodes()},
            scaled(30),
            "both nodes in the etcd registry",
        )
        assert store.generation() == res2["generation"]
        assert [(r.event_set, r.enabled) for r in store.rules()] == [("file", False)]
    finally:
        for agent in (on_a, on_b):
            agent.stop(signal.SIGKILL)
        for ctl in (a, b):
            if ctl.proc is not None:
                ctl.stop(signal.SIGKILL)


def test_concurrent_changes_through_two_stores_never_share_a_generation(etcd3):
    stores = [EtcdStore(EtcdClient([url]), "/tf-cas", Store(":memory:")) for url in etcd3[:2]]
    got: list[list[int]] = [[], []]

    def writer(i: int) -> None:
        for k in range(15):
            gen, _ = stores[i].put_rules([Rule("file" if i else "exec", bool(k % 2))])
            got[i].append(gen)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=scaled(120))
    gens = got[0] + got[1]
    assert len(gens) == 30 and len(set(gens)) == 30, sorted(gens)
    assert stores[0].generation() == max(gens) == 30
    # neither writer lost the other's rule
    assert {r.event_set for r in stores[1].rules()} == {"exec", "file"}


def _node(ctl: ControllerProc, name: str) -> dict:
    r = cli(ctl.address, "status", "-o", "json")
    if r.returncode != 0:
        return {}
    return nodes_by_name(json.loads(r.stdout)).get(name, {})


def test_an_agent_given_both_replicas_moves_to_the_survivor_when_its_replica_is_killed(
    tmp_path, etcd3
):
    """`tracefleet-agent run --controller A,B` (a real agent, real BPF): it registers with A;
    A is SIGKILLed; it registers with B within a scaled deadline, B's `tracefleet status`
    shows it connected, and a set enabled through B reaches it (its ack arrives: --wait)."""
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.fail("run `make bpf` first", pytrace=False)
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    a = ControllerProc(dirs[0], stale_after=10, extra_args=["--etcd", etcd3[0]])
    b = ControllerProc(dirs[1], stale_after=10, extra_args=["--etcd", etcd3[1]])
    a.start()
    b.start()
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "tracefleet.agent", "run",
             "--controller", f"{a.address},{b.address}", "--node", "fo-1",
             "--labels", "role=fo", "--metrics-listen", "off", "--state-file", "off",
             "--hold-seconds", "2"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: _node(a, "fo-1").get("state") == "connected", scaled(180),
                   "the agent registered with replica A (the first address)")  # fmt: skip
        assert _node(b, "fo-1").get("state") != "connected"
        a.stop(signal.SIGKILL)
        t0 = time.monotonic()
        # the stream breaks at once (RST); then a jittered backoff under a second, and B
        wait_until(lambda: _node(b, "fo-1").get("state") == "connected", scaled(60),
                   "the agent registered with replica B after A was killed")  # fmt: skip
        print(f"failover: connected to B {time.monotonic() - t0:.1f}s after A's SIGKILL")
        assert f"moving to the next controller {b.address}" in log.read_text()
        r = cli(b.address, "enable", "file", "--selector", "role=fo", "--wait",
                "--wait-timeout", f"{scaled(90):.0f}s", "-o", "json",
                timeout=scaled(120))  # fmt: skip
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["matched_nodes"] == ["fo-1"]
        node = _node(b, "fo-1")
        assert node["applied_generation"] == res["generation"]
        assert [s["name"] for s in node["statuses"] if s["enabled"] and s["attached"]] == ["file"]
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=scaled(60))
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        for ctl in (a, b):
            if ctl.proc is not None and ctl.proc.poll() is None:
                ctl.stop(signal.SIGKILL)
