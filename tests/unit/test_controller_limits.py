"""The controller's limits on what agents send (issue 15), without processes."""

from __future__ import annotations

from tracefleet.controller.domain.limits import BUDGET, Limits, Refusals
from tracefleet.v1 import agent_pb2, types_pb2


def _batch(names: list[str]) -> agent_pb2.ResultBatch:
    s = types_pb2.SetAggregate(event_set="file", delivered=len(names))
    for n in names:
        s.events_by_syscall[n] = 1
    s.outcomes.add(strategy="exit-retry", outcome="ok", count=1)
    return agent_pb2.ResultBatch(instance_id="i", seq=1, sets=[s])


def test_syscall_names_beyond_the_fleet_budget_are_dropped_and_counted() -> None:
    refusals = Refusals()
    limits = Limits(refusals)
    budget = BUDGET["syscall"]
    kept = 0
    for start in range(0, budget + 300, 500):  # several batches, each within its own limit
        b = _batch([f"sc{i}" for i in range(start, min(start + 500, budget + 300))])
        assert limits.batch(b, "n1") == ""
        kept += len(b.sets[0].events_by_syscall)
    assert kept == budget
    assert refusals.snapshot()["agent_over_budget"] == 300
    # names already known stay accepted; bad names are dropped, counted
    b = _batch(["sc1", "Bad Name", "x" * 60])
    assert limits.batch(b, "n2") == ""
    assert list(b.sets[0].events_by_syscall) == ["sc1"]
    assert refusals.snapshot()["agent_bad_name"] == 2


def test_unknown_sets_and_events_are_dropped_known_ones_kept() -> None:
    refusals = Refusals()
    limits = Limits(refusals)
    b = _batch(["openat"])
    b.sets.add(event_set="made-up", delivered=7)
    b.events.add(event_set="made-up", syscall="x")
    b.events.add(event_set="file", syscall="openat")
    assert limits.batch(b, "n1") == ""
    assert [s.event_set for s in b.sets] == ["file"]
    assert [e.event_set for e in b.events] == ["file"]
    assert refusals.snapshot()["agent_unknown_event_set"] == 1
    assert refusals.snapshot()["agent_bad_name"] == 1


def test_counts_beyond_the_limit_refuse_the_batch() -> None:
    limits = Limits(Refusals())
    b = _batch(["openat"])
    b.sets[0].events_by_syscall["openat"] = 2**40
    assert "beyond the limit" in limits.batch(b, "n1")


def test_register_keeps_only_known_sets_capabilities_and_statuses() -> None:
    refusals = Refusals()
    reg = agent_pb2.Register(node_name="n1", labels={"role": "db"})
    reg.event_sets.extend(["file", "made-up", "file"])
    reg.capabilities.add(event_set="file", strategy="exit-retry")
    reg.capabilities.add(event_set="made-up", strategy="x")
    reg.statuses.add(name="made-up", enabled=True)
    reg.statuses.add(name="exec", enabled=True)
    assert Limits(refusals).register(reg) == ""
    assert list(reg.event_sets) == ["file"]
    assert [(c.event_set, c.strategy) for c in reg.capabilities] == [("file", "exit-retry")]
    assert [(s.name, s.enabled) for s in reg.statuses] == [("exec", True)]
    bad = agent_pb2.Register(node_name="n2", labels={"role": "x" * 64})
    assert "is not a valid label" in Limits(refusals).register(bad)


def test_user_sets_are_accepted_only_with_a_rule() -> None:
    """user:NAME sets (issue 18): an agent may report one only if the controller has a rule
    for it, so agents cannot add names; sampled user events are checked the same way."""
    refusals = Refusals()
    rules: dict[str, object] = {"user:tf_test": object()}
    limits = Limits(refusals, user_sets=lambda: rules)
    b = agent_pb2.ResultBatch(instance_id="i", seq=1)
    b.sets.add(event_set="user:tf_test", delivered=5).events_by_syscall["event"] = 5
    b.sets.add(event_set="user:nobody_asked", delivered=7)
    b.sets.add(event_set="user:../x", delivered=1)
    b.events.add(event_set="user", syscall="tf_test")
    b.events.add(event_set="user", syscall="nobody_asked")
    assert limits.batch(b, "n1") == ""
    assert [(s.event_set, s.delivered) for s in b.sets] == [("user:tf_test", 5)]
    assert [e.syscall for e in b.events] == ["tf_test"]
    assert refusals.snapshot()["agent_unknown_event_set"] == 2
    st = [types_pb2.SetStatus(name="user:tf_test"), types_pb2.SetStatus(name="user:other")]
    assert [s.name for s in limits.statuses(st, "n1")] == ["user:tf_test"]
