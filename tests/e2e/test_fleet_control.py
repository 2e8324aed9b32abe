"""End to end on loopback: a real controller process, simulated agents (SyntheticEngine) in
their own processes, and the tracefleet CLI."""

import json
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import scaled
from tests.e2e.fleet_helpers import (
    AgentProc,
    ControllerProc,
    cli,
    cli_json,
    enabled_sets,
    nodes_by_name,
    status,
    wait_until,
)

pytestmark = pytest.mark.e2e

NODES = {
    "db-1": "role=db,zone=a",
    "db-2": "role=db,zone=b",
    "web-1": "role=web",
    "web-2": "role=web",
}


@pytest.fixture
def fleet(tmp_path):
    ctl = ControllerProc(tmp_path).start()
    agents = {n: AgentProc(tmp_path, ctl.address, n, labels).start() for n, labels in NODES.items()}
    try:
        wait_until(
            lambda: (
                {n["name"] for n in status(ctl.address)["nodes"] if n["state"] == "connected"}
                == set(NODES)
            ),
            what="all agents connected",
        )
        yield ctl, agents
    finally:
        for a in agents.values():
            a.stop(signal.SIGKILL)
        ctl.stop(signal.SIGKILL)


def test_enable_reaches_matching_nodes_events_flow_and_ttl_switches_off(fleet):
    ctl, agents = fleet
    addr = ctl.address
    res = cli_json(addr, "enable", "file", "--selector", "role=db", "--ttl", "4s", "--wait")
    assert res["matched_nodes"] == ["db-1", "db-2"]
    assert res["wait"]["applied"] == ["db-1", "db-2"] and res["wait"]["pending"] == []
    gen = res["generation"]

    nodes = nodes_by_name(status(addr))
    assert enabled_sets(nodes["db-1"]) == enabled_sets(nodes["db-2"]) == {"file"}
    assert enabled_sets(nodes["web-1"]) == enabled_sets(nodes["web-2"]) == set()
    for n in nodes.values():  # every connected node acked the fleet generation
        assert n["applied_generation"] == gen and not n["pending"]
    # the agents' engines really run it
    for name in NODES:
        wait_until(
            lambda name=name: (
                agents[name].stats() and agents[name].stats()[0]["applied_generation"] == gen
            ),
            what=f"{name} stats",
        )
        assert agents[name].stats()[0]["enabled"] == (["file"] if name.startswith("db") else [])

    # sampled events while a client follows: only from the db nodes
    r = cli(addr, "events", "--follow", "--event-set", "file", "--count", "6", "-o", "json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(events) == 6
    assert {e["node"] for e in events} <= {"db-1", "db-2"}
    assert all(e["event_set"] == "file" and e["args"]["path"]["value"] for e in events)
    pid = events[0]["pid"]
    r = cli(
        addr,
        "events",
        "--follow",
        "--node",
        "db-2",
        "--pid",
        str(pid),
        "--count",
        "3",
        "-o",
        "json",
    )
    assert r.returncode == 0, r.stderr
    assert {(e["node"], e["pid"]) for e in map(json.loads, r.stdout.splitlines())} == {
        ("db-2", pid)
    }

    top = wait_until(lambda: cli_json(addr, "top")["rows"], what="top rows")
    assert {row["node"] for row in top} <= {"db-1", "db-2"}
    assert all(row["event_set"] == "file" and row["events_per_second"] > 0 for row in top)
    (summary,) = cli_json(addr, "top")["sets"]
    assert summary["nodes"] == 2 and summary["latency"]["counts"]
    assert sum(summary["latency"]["counts"]) > 0

    # TTL: the controller switches the set off by itself, under a new generation
    def expired():
        st = status(addr)
        nodes = nodes_by_name(st)
        return (
            st["rules"][0]["expired"]
            and all(
                not enabled_sets(n) and n["applied_generation"] == st["generation"]
                for n in nodes.values()
            )
            and st
        )

    st = wait_until(expired, timeout=30, what="TTL expiry applied")
    assert st["generation"] == gen + 1
    r = cli(addr, "enable", "nope")
    assert r.returncode == 4 and "known event sets: exec, file, net, vfs" in r.stderr


def test_restarts_converge_without_reapplying_and_stale_agents(fleet, tmp_path):
    ctl, agents = fleet
    addr = ctl.address
    res = cli_json(addr, "enable", "exec", "--selector", "role=web", "--wait")
    gen = res["generation"]
    wait_until(
        lambda: all(
            a.stats() and a.stats()[0]["applied_generation"] == gen for a in agents.values()
        )
    )
    before = {n: a.stats()[0] for n, a in agents.items()}

    # controller restart: state survives; agents stay static meanwhile, then reconnect
    assert ctl.stop() == 0
    wait_until(
        lambda: not any(a.stats()[0]["connected"] for a in agents.values()), what="agents notice"
    )
    for name in ("web-1", "web-2"):
        assert agents[name].stats()[0]["enabled"] == ["exec"]  # fail-static
    ctl.start()

    def converged():
        st = status(addr)
        nodes = nodes_by_name(st)
        ok = all(
            n["state"] == "connected" and n["applied_generation"] == gen for n in nodes.values()
        )
        return ok and st

    st = wait_until(converged, what="reconnect after controller restart")
    assert st["generation"] == gen  # nothing lost, no new generation
    assert [r["event_set"] for r in st["rules"]] == ["exec"] and st["rules"][0][
        "selector"
    ] == "role=web"
    for name, a in agents.items():
        wait_until(lambda a=a: a.stats()[0]["connects"] >= 2, what=f"{name} reconnected")
        after = a.stats()[0]
        assert after["applies"] == before[name]["applies"], f"{name} applied again"
        assert after["enabled"] == before[name]["enabled"]

    # a killed agent turns stale; restarted, it resyncs (a fresh process applies once)
    agents["web-1"].stop(signal.SIGKILL)
    wait_until(lambda: nodes_by_name(status(addr))["web-1"]["state"] == "stale", what="web-1 stale")
    assert nodes_by_name(status(addr))["web-2"]["state"] == "connected"
    res = cli_json(addr, "enable", "file", "--selector", "node=web-1|db-1", "--wait")
    assert res["wait"]["not_connected"] == ["web-1"] and res["wait"]["applied"] == ["db-1"]
    agents["web-1"].start()
    node = wait_until(
        lambda: (
            (n := nodes_by_name(status(addr))["web-1"])["state"] == "connected"
            and n["applied_generation"] == res["generation"]
            and n
        ),
        what="web-1 resynced",
    )
    assert enabled_sets(node) == {"exec", "file"}
    # the agent's own report may trail its ack by one write
    wait_until(
        lambda: (st := agents["web-1"].stats()) and st[0]["enabled"] == ["file", "exec"],
        what="web-1 reports file and exec enabled",
    )


def test_ctrl_c_ends_a_following_events_stream_promptly(fleet, tmp_path):
    """`tracefleet events --follow` ends on Ctrl-C (or SIGTERM) with its lines whole, wherever
    the signal lands: a KeyboardInterrupt raised inside grpc's iterator could leave the CLI
    unable to close its channel (CI saw it still running 120 s after SIGINT)."""
    ctl, _ = fleet
    addr = ctl.address
    assert cli(addr, "enable", "file", "--selector", "role=db", "--wait").returncode == 0
    for i in range(12):
        err_path = tmp_path / f"events-{i}.err"
        with open(err_path, "w") as err:
            p = subprocess.Popen(
                [sys.executable, "-m", "tracefleet.controller.operator.cli", "--controller", addr,
                 "-o", "json", "events", "--follow", "--event-set", "file"],
                stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        # one reader of stdout, to the end (a second one on the same pipe splits lines)
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(p.stdout,), daemon=True)
        reader.start()
        wait_until(lines.copy, timeout=scaled(60), what="the first event")
        time.sleep(random.uniform(0, 0.3))  # the signal lands while the stream runs
        p.send_signal(signal.SIGINT if i % 2 == 0 else signal.SIGTERM)
        try:
            p.wait(timeout=scaled(30))
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"round {i}: `tracefleet events` still running 30 s after the signal")
        reader.join(timeout=scaled(30))
        assert p.returncode == 0, err_path.read_text()
        for line in lines:
            json.loads(line)  # whole lines only
