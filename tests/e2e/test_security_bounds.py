"""Bounded agents (issue 15): a real controller process checks what agents send against its
own registry and stated limits, refuses the rest with a counted reason, never lets an agent
create metric series, forgets stale nodes, and `tracefleet node rm` removes one."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import grpc
import pytest

from tests.conftest import wait_until
from tests.e2e.security_helpers import (
    RawAgent,
    start_controller,
    tf,
)
from tests.ports import free_port
from tracefleet.v1 import agent_pb2, types_pb2


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        return r.read().decode()


def refused(text: str, reason: str) -> float:
    for line in text.splitlines():
        if line.startswith("tracefleet_controller_refused_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no refused_total series for {reason}")


def status(d: Path) -> dict:
    r = tf(d, "-o", "json", "status")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def batch(seq: int, sets: list[types_pb2.SetAggregate]) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        result_batch=agent_pb2.ResultBatch(instance_id="raw-1", seq=seq, sets=sets)
    )


def test_made_up_names_and_counts_are_refused_and_counted(sockdir: Path, groups) -> None:
    port = free_port()
    proc = start_controller(sockdir, groups, "--metrics-listen", f"127.0.0.1:{port}")
    agent = None
    try:
        before = metrics(port)
        fake = [f"made-up-{i}" for i in range(20_000)]
        reg = agent_pb2.Register(node_name="db-1", instance_id="raw-1", labels={"role": "db"})
        reg.event_sets.extend(["file", *fake])
        agent = RawAgent(f"unix:{sockdir}/ctl.sock", "db-1", register=reg)
        agent.wait_for("desired_state", 60)
        st = status(sockdir)
        assert st["known_event_sets"] == ["exec", "file", "net", "vfs"]
        assert not {s for n in st["nodes"] for s in n.get("event_sets", [])} - {"file"}
        r = tf(sockdir, "enable", "made-up-7")
        assert r.returncode == 4 and "unknown event set 'made-up-7'" in r.stderr

        # one batch: a real set with 20,000 made-up syscall names, and 20,000 made-up sets
        s = types_pb2.SetAggregate(event_set="file", delivered=5)
        for i in range(20_000):
            s.events_by_syscall[f"sc{i}"] = 1
        sets = [s] + [types_pb2.SetAggregate(event_set=n, delivered=1) for n in fake]
        agent.out.put(batch(1, sets))
        # ... refused as a whole (more syscalls than a kernel has): the stream is dropped
        agent.wait_closed(60)
        after = metrics(port)
        assert refused(after, "agent_unknown_event_set") >= 1
        assert refused(after, "agent_too_many_entries") >= 1
        assert "made-up" not in after and 'syscall="sc1"' not in after
        grown = len(after.splitlines()) - len(before.splitlines())
        print(f"/metrics lines: {len(before.splitlines())} before, {len(after.splitlines())} after")
        assert grown < 200, grown  # the node's series for its one known set, not 20,000

        # counts beyond the stated limit: refused, nothing counted
        agent.close()
        agent = RawAgent(f"unix:{sockdir}/ctl.sock", "db-1")
        agent.wait_for("desired_state", 60)
        agent.out.put(batch(1, [types_pb2.SetAggregate(event_set="file", delivered=10**12)]))
        agent.wait_closed(60)
        node = {n["name"]: n for n in status(sockdir)["nodes"]}["db-1"]
        assert json.dumps(node).count("1000000000000") == 0
        assert refused(metrics(port), "agent_count_out_of_range") == 1
        log = (sockdir / "controller.log").read_text()
        assert "a count of 1000000000000 is beyond the limit" in log
        assert "Traceback" not in log

        # labels outside the label syntax: registration refused with the reason
        agent.close()
        bad = agent_pb2.Register(node_name="db-2", labels={"role": "x" * 200})
        agent = RawAgent(f"unix:{sockdir}/ctl.sock", "db-2", register=bad)
        err = agent.wait_closed(60)
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not a valid label" in err.details()
    finally:
        if agent is not None:
            agent.close()
        proc.terminate()
        proc.wait(timeout=60)


def test_node_limit_node_rm_and_forgetting(sockdir: Path, groups) -> None:
    _, read = groups
    proc = start_controller(sockdir, groups, "--max-nodes", "2")
    try:
        a1 = RawAgent(f"unix:{sockdir}/ctl.sock", "n1")
        a1.wait_for("desired_state", 60)
        a2 = RawAgent(f"unix:{sockdir}/ctl.sock", "n2")
        a2.wait_for("desired_state", 60)
        a3 = RawAgent(f"unix:{sockdir}/ctl.sock", "n3")
        err = a3.wait_closed(60)
        assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-nodes" in err.details() and "node rm" in err.details()

        r = tf(sockdir, "node", "rm", "n1")
        assert r.returncode == 4 and "is connected: stop its agent first" in r.stderr
        a1.close()
        wait_until(
            lambda: {n["name"]: n["state"] for n in status(sockdir)["nodes"]}["n1"] != "connected",
            60, "n1 to disconnect",
        )  # fmt: skip
        r = tf(sockdir, "node", "rm", "n1", group=read)
        assert r.returncode == 4 and "role read" in r.stderr, r.stderr
        r = tf(sockdir, "node", "rm", "n1")
        assert r.returncode == 0 and "node n1 removed" in r.stdout, r.stderr
        assert tf(sockdir, "node", "rm", "n1").returncode == 4
        assert tf(sockdir, "node", "rm", "").returncode == 2
        # the slot is free again
        a3 = RawAgent(f"unix:{sockdir}/ctl.sock", "n3")
        a3.wait_for("desired_state", 60)
        a2.close()
        a3.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # removed for good: not back after a restart
    proc = start_controller(sockdir, groups, "--forget-after", "1")
    try:
        names = {n["name"] for n in status(sockdir)["nodes"]}
        assert "n1" not in names
        # n2, n3 are disconnected: forgotten once not heard from for 1 s
        wait_until(lambda: not status(sockdir)["nodes"], 120, "stale nodes to be forgotten")
        assert "forgot node n2" in (sockdir / "controller.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_api_fields_have_ranges(sockdir: Path, groups) -> None:
    """Raw gRPC requests the CLI would not send: each refused with INVALID_ARGUMENT naming
    the range, nothing stored."""
    from google.protobuf import duration_pb2

    from tracefleet.v1 import control_pb2, control_pb2_grpc

    proc = start_controller(sockdir, groups)
    try:
        with grpc.insecure_channel(f"unix:{sockdir}/ctl.sock") as ch:
            stub = control_pb2_grpc.ControlServiceStub(ch)
            req = control_pb2.ConfigureEventSetRequest
            cases = [
                (req(event_set="file", enabled=True, ttl=duration_pb2.Duration(seconds=2**62)),
                 "ttl of 4611686018427387904s 0ns is out of range"),
                (req(event_set="file", enabled=True, selector="node=" + "a" * 3_000_000),
                 "selector of 3000005 characters: at most 4096"),
                (req(event_set="file", enabled=True,
                     filters=types_pb2.Filters(pids=list(range(1, 100_001)))),
                 "at most 8 pids per rule (got 100000)"),
                (req(event_set="file", enabled=True, filters=types_pb2.Filters(pids=[2**31 - 1])),
                 "pids must be 1..4194304, got 2147483647"),
                (req(event_set="file", enabled=True, filters=types_pb2.Filters(comms=["x" * 16])),
                 "1..15 printable bytes"),
                (req(event_set="x" * 3_000_000, enabled=True), "(3000000 characters)"),
            ]  # fmt: skip
            for request, fragment in cases:
                with pytest.raises(grpc.RpcError) as e:
                    stub.ConfigureEventSet(request, timeout=60)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
                assert fragment in e.value.details() and len(e.value.details()) < 400
            with pytest.raises(grpc.RpcError) as e:
                stub.GetTop(control_pb2.GetTopRequest(limit=2**31), timeout=60)
            assert "limit must be 1..10000" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                stream = stub.StreamEvents(
                    control_pb2.StreamEventsRequest(pids=list(range(1, 100_001))), timeout=60
                )
                next(iter(stream))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "pids: at most 1000" in e.value.details()
        st = status(sockdir)
        assert st["rules"] == [] and st["generation"] == 0
        assert "Traceback" not in (sockdir / "controller.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
