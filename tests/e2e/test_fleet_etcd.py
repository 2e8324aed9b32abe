"""Controller replicas sharing the desired state and the node registry in etcd: a real
3-member etcd cluster on loopback (Debian etcd-server), two controller processes, a simulated
agent on each. A change made through one replica reaches the agent of the other, and
concurrent changes through two stores never issue the same generation. A real agent given
both replicas' addresses moves to the survivor when its replica is SIGKILLed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BPF_DIR, require_root, scaled
from tests.e2e.fleet_helpers import (
    AgentProc,
    ControllerProc,
    cli,
    cli_json,
    nodes_by_name,
    wait_until,
)
from tests.etcd_cluster import EtcdCluster, etcd_cluster
from tests.ports import free_port
from tracefleet.agent.control.client import first_controller
from tracefleet.controller.domain.rules import Rule
from tracefleet.controller.storage.etcdclient import EtcdClient, b64
from tracefleet.controller.storage.etcdstore import EtcdStore
from tracefleet.controller.storage.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[list[str]]:
    """Client URLs of a fresh 3-member etcd cluster on loopback."""
    with etcd_cluster(tmp_path / "etcd", timeout=scaled(30)) as cluster:
        yield cluster.urls


@pytest.fixture
def etcd3_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster on loopback, with its members' pids (to stop some)."""
    with etcd_cluster(tmp_path / "etcd", timeout=scaled(30)) as cluster:
        yield cluster


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
        _wait_applied((on_a, on_b), gen, ["file"])
        # the other way, under a later generation
        res2 = cli_json(b.address, "disable", "file")
        assert res2["generation"] > gen
        _wait_applied((on_a,), res2["generation"], [])
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
    # a node whose first address (a hash of its name) is A's
    name = next(f"fo-{i}" for i in range(100) if first_controller(f"fo-{i}", 2) == 0)
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "tracefleet.agent", "run",
             "--controller", f"{a.address},{b.address}", "--node", name,
             "--labels", "role=fo", "--metrics-listen", "off", "--state-file", "off",
             "--hold-seconds", "2"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: _node(a, name).get("state") == "connected", scaled(180),
                   "the agent registered with replica A (its first address)")  # fmt: skip
        assert _node(b, name).get("state") != "connected"
        a.stop(signal.SIGKILL)
        t0 = time.monotonic()
        # the stream breaks at once (RST); then a jittered backoff under a second, and B
        wait_until(lambda: _node(b, name).get("state") == "connected", scaled(60),
                   "the agent registered with replica B after A was killed")  # fmt: skip
        print(f"failover: connected to B {time.monotonic() - t0:.1f}s after A's SIGKILL")
        assert f"moving to the next controller {b.address}" in log.read_text()
        r = cli(b.address, "enable", "file", "--selector", "role=fo", "--wait",
                "--wait-timeout", f"{scaled(90):.0f}s", "-o", "json",
                timeout=scaled(120))  # fmt: skip
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["matched_nodes"] == [name]
        node = _node(b, name)
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


def test_replica_sigkill_under_load_keeps_every_count_exact(tmp_path, etcd3):
    """Simulated agents (in this process, so what each produced is known exactly) given
    [A, B]; most start on A. A is SIGKILLed while result batches are written and not yet
    acknowledged; its agents move to B and resend what A had not acknowledged. For every
    agent, the events it produced equal B's totals plus what it discarded, to the event (the
    batches A committed are duplicates on B: the ledger is in etcd), and again after B is
    SIGKILLed and restarted (its totals come from etcd, not from its --db)."""
    import asyncio

    from tests.loadgen import SyntheticEngine
    from tracefleet.agent.control.client import ClientOptions, ControlClient

    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    a = ControllerProc(dirs[0], stale_after=10, extra_args=["--etcd", etcd3[0]])
    b = ControllerProc(dirs[1], stale_after=10, extra_args=["--etcd", etcd3[1]])
    a.start()
    b.start()
    addresses = [a.address, b.address]
    # 6 nodes whose first address (a hash of the name) is A, 2 whose first is B
    on_a = [n for n in (f"ex-{i:02d}" for i in range(100)) if first_controller(n, 2) == 0][:6]
    on_b = [n for n in (f"ex-{i:02d}" for i in range(100)) if first_controller(n, 2) == 1][:2]
    opts = ClientOptions(interval=0.2, backoff_initial=0.2, backoff_max=1.0,
                         buffer_budget=600, offload_engine_calls=False,
                         answer_timeout=scaled(10), agent_version="replica-exact")  # fmt: skip
    engines = [SyntheticEngine(2000.0, seed=i) for i in range(len(on_a) + len(on_b))]
    clients = [
        ControlClient(e, addresses, name, {"role": "ex"}, opts)
        for e, name in zip(engines, on_a + on_b, strict=True)
    ]
    report: dict[str, float] = {}

    async def until(pred, timeout: float, what: str) -> float:
        t0 = time.monotonic()
        while not pred():
            assert time.monotonic() - t0 < timeout, f"timed out after {timeout:.0f}s: {what}"
            await asyncio.sleep(0.05)
        return time.monotonic() - t0

    async def all_acked() -> None:
        marks = [c._outbox.last_seq for c in clients]
        await until(lambda: all(c._outbox.acked >= m for c, m in zip(clients, marks, strict=True)),
                    scaled(60), "every batch acknowledged")  # fmt: skip

    async def scenario() -> None:
        stop = asyncio.Event()
        runs = [asyncio.create_task(c.run(stop)) for c in clients]
        try:
            await until(lambda: all(c.connected for c in clients), scaled(60), "connected")
            assert {c.controller for c in clients[: len(on_a)]} == {a.address}
            # through A: B takes the change from etcd and pushes it to its own agents
            r = await asyncio.to_thread(cli, a.address, "enable", "file", "--selector",
                                        "role=ex", "--wait")  # fmt: skip
            assert r.returncode == 0, r.stderr
            await until(lambda: all(e.enabled() == ["file"] for e in engines), scaled(30),
                        "file enabled on every agent")  # fmt: skip
            more = [c._outbox.acked + 5 for c in clients]
            ok = lambda: all(c._outbox.acked >= m for c, m in zip(clients, more, strict=True))  # noqa: E731
            await until(ok, scaled(60), "5 more batches acked on every agent")
            # A holds BatchAcks back (merged, up to 2 s): batches written 3 intervals ago
            # are committed there and not acknowledged, the case a per-replica ledger counts
            # twice
            await until(lambda: all(c._outbox.written - c._outbox.acked >= 3
                                    for c in clients[: len(on_a)]),
                        scaled(30), "3 batches unacknowledged by A on each agent")  # fmt: skip
            report["unacked_at_kill"] = sum(
                c._outbox.last_seq - c._outbox.acked for c in clients[: len(on_a)]
            )
            t_kill = time.monotonic()
            a.stop(signal.SIGKILL)
            await until(lambda: all(c.controller == b.address and c.connected and c._synced
                                    for c in clients), scaled(60), "every agent on B")  # fmt: skip
            report["failover_s"] = time.monotonic() - t_kill
            await all_acked()
            r = await asyncio.to_thread(cli, b.address, "disable", "file", "--wait")
            assert r.returncode == 0, r.stderr
            await until(lambda: all(not e.enabled() for e in engines), scaled(30), "disabled")
            marks = [c._outbox.last_seq for c in clients]
            await until(lambda: all(c._outbox.last_seq >= m + 2 for c, m in zip(clients, marks,
                        strict=True)), scaled(30), "batches after the disable")  # fmt: skip
            await all_acked()
        finally:
            stop.set()
            await asyncio.gather(*runs, return_exceptions=True)

    def exact(status: dict) -> list[str]:
        nodes = nodes_by_name(status)
        wrong = []
        for c, e in zip(clients, engines, strict=True):
            t = e.totals()["file"]
            tot = {x["event_set"]: x for x in nodes[c.node_name]["totals"]}.get("file", {})
            counted = int(tot.get("delivered", 0)) + int(tot.get("dropped", 0))
            discarded = int(tot.get("discarded", 0))
            if t.delivered + t.dropped != counted + discarded:
                wrong.append(f"{c.node_name}: produced {t.delivered + t.dropped}, counted "
                             f"{counted} + discarded {discarded}")  # fmt: skip
        return wrong

    try:
        asyncio.run(scenario())
        live = cli_json(b.address, "status")
        b.stop(signal.SIGKILL)
        b.start()

        def status_once() -> dict | None:
            r = cli(b.address, "status", "-o", "json")
            return json.loads(r.stdout) if r.returncode == 0 else None

        restarted = wait_until(status_once, scaled(30), "status of the restarted B")
    finally:
        for ctl in (a, b):
            if ctl.proc is not None and ctl.proc.poll() is None:
                ctl.stop(signal.SIGKILL)
    dup = sum(int(n["batches_duplicate"]) for n in nodes_by_name(live).values())
    resent = sum(c.stats.batches_resent for c in clients)
    print(f"\nREPLICA SIGKILL: {len(on_a)} agents moved A -> B in {report['failover_s']:.1f}s, "
          f"{report['unacked_at_kill']:.0f} batches unacknowledged at the kill, {resent} resent,"
          f" {dup} ignored on B as duplicates")  # fmt: skip
    assert dup > 0  # the resend included batches A had committed
    assert exact(live) == []
    assert exact(restarted) == []
    assert all(c.stats.events_discarded == 0 for c in clients)


@contextlib.contextmanager
def _watching(client: EtcdClient, key: str, revision: int) -> Iterator[list[tuple[str, int]]]:
    """client.watch(key) from ``revision`` in a thread; the (value, mod_revision) it hands
    over, as they come."""
    got: list[tuple[str, int]] = []
    stop = threading.Event()
    t = threading.Thread(
        target=client.watch, args=(key, revision, lambda v, r: got.append((v, r)), stop)
    )
    t.start()
    try:
        yield got
    finally:
        stop.set()


def _put(client: EtcdClient, key: str, value: str) -> int:
    body = {"key": b64(key), "value": b64(value)}
    return int(client.call("/v3/kv/put", body)["header"]["revision"])


def test_a_watch_on_a_hung_etcd_member_moves_to_another(etcd3_cluster):
    """The member a replica's watch is on hangs (SIGSTOP: the stream stays open, nothing
    comes): a change made through the other members still reaches the watch, without the
    member coming back."""
    urls, pids = etcd3_cluster.urls, etcd3_cluster.pids
    writer = EtcdClient(urls[1:])
    rev = _put(writer, "/w/desired", "one")
    watcher = EtcdClient(urls[:2])  # watches on urls[0] first
    with _watching(watcher, "/w/desired", rev) as got:
        # its first value handed over: the stream is open on urls[0] before it is stopped
        wait_until(lambda: got, scaled(30), "the watch on the first member")
        os.kill(pids[0], signal.SIGSTOP)
        try:
            rev2 = _put(writer, "/w/desired", "two")
            wait_until(lambda: len(got) == 2, scaled(60), "the change, through the others")
            assert got == [("one", rev), ("two", rev2)]
        finally:
            os.kill(pids[0], signal.SIGCONT)


def test_a_watch_from_a_compacted_revision_reads_the_key_and_carries_on(etcd3):
    """etcd compacted its history past the revision a watch starts from (a replica that was
    away while the cluster compacted): the watch hands over the key's value as it is now,
    then the changes after it, instead of being cancelled again and again."""
    client = EtcdClient(etcd3)
    rev1 = _put(client, "/c/desired", "one")
    for i in range(5):
        _put(client, "/c/other", str(i))
    rev2 = _put(client, "/c/desired", "two")
    for i in range(5):
        last = _put(client, "/c/other", str(i))
    client.call("/v3/kv/compaction", {"revision": str(last), "physical": True})
    with _watching(client, "/c/desired", rev1 + 1) as got:
        wait_until(lambda: got, scaled(30), "the key's value as it is now")
        assert got == [("two", rev2)]
        rev3 = _put(client, "/c/desired", "three")
        wait_until(lambda: len(got) == 2, scaled(30), "the change after the compaction")
        assert got == [("two", rev2), ("three", rev3)]


def test_a_ledger_document_another_replica_changed_is_never_overwritten(etcd3):
    """Two replicas' stores on one prefix: a node's ledger document written by one is not
    overwritten by the other from a stale read (put_ledger names the node instead), and
    is written once read again (node_ledgers)."""
    from tracefleet.controller.storage.store import SET_ACCOUNTING, LedgerRows

    zeros = (0,) * len(SET_ACCOUNTING)

    def rows(seq: int, delivered: int) -> LedgerRows:
        return LedgerRows(
            set_totals=[("n1", "file", delivered, 0, 0, *zeros)],
            node_batches=[("n1", seq, 0, 0)],
            cursors=[("n1", "inst", seq, float(seq))],
        )

    one = EtcdStore(EtcdClient(etcd3[:1]), "/ledger-cas", Store(":memory:"))
    two = EtcdStore(EtcdClient(etcd3[1:2]), "/ledger-cas", Store(":memory:"))
    assert one.ledger().cursors == [] and two.ledger().cursors == []
    assert one.put_ledger(rows(1, 10)) == set()
    assert two.put_ledger(rows(1, 7)) == {"n1"}  # two never saw one's write
    assert two.node_ledgers(["n1"]) == {"n1": rows(1, 10)}
    assert two.put_ledger(rows(2, 15)) == set()
    assert one.put_ledger(rows(2, 99)) == {"n1"}  # now one's read is stale
    fresh = EtcdStore(EtcdClient(etcd3), "/ledger-cas", Store(":memory:"))
    assert fresh.ledger() == rows(2, 15)


def _replicas_with_agents(
    tmp_path: Path, a_etcd: list[str], b_etcd: list[str], a_metrics: int = 0
) -> tuple[ControllerProc, ControllerProc, AgentProc, AgentProc]:
    """Replicas A and B on the given etcd endpoints, a simulated agent on each (role=db), and
    `file` enabled through A and applied by both agents. a_metrics: A's /metrics port."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    metrics = ["--metrics-listen", f"127.0.0.1:{a_metrics}"] if a_metrics else []
    a = ControllerProc(dirs[0], stale_after=10,
                       extra_args=["--etcd", ",".join(a_etcd), *metrics])  # fmt: skip
    b = ControllerProc(dirs[1], stale_after=10, extra_args=["--etcd", ",".join(b_etcd)])
    a.start()
    b.start()
    on_a = AgentProc(tmp_path, a.address, "on-a", labels="role=db").start()
    on_b = AgentProc(tmp_path, b.address, "on-b", labels="role=db").start()
    for agent in (on_a, on_b):
        wait_until(lambda ag=agent: _agent(ag).get("connected"), scaled(30), agent.name)
    gen = cli_json(a.address, "enable", "file", "--selector", "role=db")["generation"]
    _wait_applied((on_a, on_b), gen, ["file"])
    return a, b, on_a, on_b


def _wait_applied(agents: tuple[AgentProc, ...], gen: int, enabled: list[str]) -> None:
    for agent in agents:
        wait_until(
            lambda ag=agent: (
                _agent(ag).get("applied_generation") == gen
                and sorted(_agent(ag).get("enabled") or []) == enabled
            ),
            scaled(30),
            f"{agent.name} applied generation {gen} with {enabled} enabled",
        )


def _stop_all(procs: tuple[AgentProc | ControllerProc, ...]) -> None:
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.stop(signal.SIGKILL)


def _leader(urls: list[str]) -> int:
    """Index of the etcd member that leads the cluster."""
    ids = []
    for url in urls:
        req = urllib.request.Request(f"{url}/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            st = json.loads(resp.read())
        ids.append((st["header"]["member_id"], st["leader"]))
    (leader,) = {lead for _, lead in ids}
    return [member for member, _ in ids].index(leader)


def test_an_etcd_member_whose_port_is_taken_is_started_again_on_new_ports(tmp_path, monkeypatch):
    """The cluster every etcd test starts: a member whose port another process took between
    the pick and its listen ("address already in use") does not fail the test; all members
    start again on new ports."""
    import tests.etcd_cluster as ec

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port()))
        busy.listen()
        taken = busy.getsockname()[1]
        picks = iter([taken])
        monkeypatch.setattr(ec, "free_port", lambda: next(picks, None) or free_port())
        with etcd_cluster(tmp_path / "etcd", timeout=scaled(30)) as cluster:
            assert all(f":{taken}" not in url for url in cluster.urls), cluster.urls
            assert next(picks, None) is None, "the taken port was never tried"
            for url in cluster.urls:  # every member serves the cluster's data
                assert urllib.request.urlopen(url + "/health", timeout=scaled(5)).status == 200


def test_one_etcd_member_killed_the_replicas_carry_on(tmp_path, etcd3_cluster):
    """SIGKILL the etcd leader (2 of 3 members left: the quorum holds, after an election):
    a change made through A at once is made, shared with B through etcd, and applied by both
    agents; so is one through B."""
    urls = etcd3_cluster.urls
    a, b, on_a, on_b = _replicas_with_agents(tmp_path, urls[:2], urls[1:])
    try:
        os.kill(etcd3_cluster.pids[_leader(urls)], signal.SIGKILL)
        res = cli_json(a.address, "enable", "net", "--selector", "role=db")
        _wait_applied((on_a, on_b), res["generation"], ["file", "net"])
        res2 = cli_json(b.address, "disable", "file")
        assert res2["generation"] == res["generation"] + 1
        _wait_applied((on_a, on_b), res2["generation"], ["net"])
    finally:
        _stop_all((on_a, on_b, a, b))


def test_etcd_quorum_lost_changes_are_refused_and_agents_keep_their_state(tmp_path, etcd3_cluster):
    """Two of three etcd members stopped (SIGSTOP: they hang, as behind a partition): no
    quorum. An enable and a disable, through either replica, are refused with an error that
    names etcd and what to check, and neither is applied anywhere (a disable applied by one
    replica alone would split the fleet); both replicas still answer `status`, their agents
    stay connected with their last state, and each replica's log says etcd is unavailable.
    With the members back, the next change takes the next generation and reaches both."""
    urls, pids = etcd3_cluster.urls, etcd3_cluster.pids
    port = free_port()
    a, b, on_a, on_b = _replicas_with_agents(tmp_path, urls[:2], urls[2:], a_metrics=port)
    gen = _agent(on_a)["applied_generation"]
    assert _etcd_available(port) == 1.0
    stopped = pids[1:]
    try:
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        for ctl, args in (
            (a, ("enable", "net", "--selector", "role=db")),
            (b, ("disable", "file")),
        ):
            r = cli(ctl.address, *args)
            assert r.returncode != 0, f"tracefleet {' '.join(args)} was accepted: {r.stdout}"
            assert "etcd" in r.stderr and "majority" in r.stderr, r.stderr
        for ctl, agent in ((a, on_a), (b, on_b)):
            r = cli(ctl.address, "status", "-o", "json")
            assert r.returncode == 0, r.stderr
            st = json.loads(r.stdout)
            assert "etcd unavailable" in st["changes_refused"], st["changes_refused"]
            node = nodes_by_name(st)[agent.name]
            assert node["state"] == "connected" and node["applied_generation"] == gen, node
            text = cli(ctl.address, "status").stdout
            assert "changes refused: etcd unavailable" in text, text
            assert _agent(agent).get("enabled") == ["file"]
            assert "etcd unavailable" in ctl.log.read_text()
        assert _etcd_available(port) == 0.0
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped = []
        res = wait_until(lambda: _try_enable(a.address), scaled(60), "etcd to take writes again")
        assert res["generation"] == gen + 1, "a refused change took a generation"
        _wait_applied((on_a, on_b), gen + 1, ["file", "net"])
        for ctl in (a, b):  # B learns of it from its own probe (the change came by watch)
            wait_until(lambda c=ctl: "etcd available again" in c.log.read_text(), scaled(30),
                       f"{ctl.address} to log that etcd is available again")  # fmt: skip
        assert _etcd_available(port) == 1.0
        assert cli_json(a.address, "status")["changes_refused"] == ""
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        _stop_all((on_a, on_b, a, b))


def _etcd_available(port: int) -> float:
    """tracefleet_controller_etcd_available on a replica's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    (line,) = [
        x for x in text.splitlines() if x.startswith("tracefleet_controller_etcd_available ")
    ]
    return float(line.split()[1])


def _try_enable(address: str) -> dict | None:
    r = cli(address, "enable", "net", "--selector", "role=db", "-o", "json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def test_rules_and_ttls_survive_a_replica_sigkill(tmp_path, etcd3):
    """Through replica A: `file` on (no TTL), `exec` for an hour, `net` for seconds. A is
    SIGKILLed: B shows the three rules with the deadlines A set, and B (A is gone) switches
    `net` off when its TTL runs out, under a new generation stored in etcd."""
    a, b, on_a, on_b = _replicas_with_agents(tmp_path, etcd3[:1], etcd3[1:2])
    try:
        hour = cli_json(a.address, "enable", "exec", "--selector", "role=db", "--ttl", "1h")
        ttl = f"{scaled(10):.0f}s"
        short = cli_json(a.address, "enable", "net", "--selector", "role=db", "--ttl", ttl)
        deadlines = {"exec": hour["expires_at"], "net": short["expires_at"]}
        assert all(deadlines.values()), deadlines
        a.stop(signal.SIGKILL)
        rules = {r["event_set"]: r for r in cli_json(b.address, "status")["rules"]}
        assert sorted(rules) == ["exec", "file", "net"]
        assert {s: rules[s].get("expires_at") for s in deadlines} == deadlines
        assert rules["file"]["enabled"] and not rules["file"].get("expires_at")

        def net_expired() -> dict | None:
            st = cli_json(b.address, "status")
            net = {r["event_set"]: r for r in st["rules"]}["net"]
            return st if net.get("expired") else None

        st = wait_until(net_expired, scaled(60), "B to expire net")
        assert st["generation"] > short["generation"]
        store = EtcdStore(EtcdClient(etcd3[1:2]), "/tracefleet", Store(":memory:"))
        stored = {r.event_set: r for r in store.rules()}
        assert stored["net"].expired and not stored["exec"].expired
        assert store.generation() == st["generation"]
        wait_until(
            lambda: sorted(_agent(on_b).get("enabled") or []) == ["exec", "file"],
            scaled(30),
            "on-b with exec and file on, net off",
        )
    finally:
        _stop_all((on_a, on_b, a, b))
