"""Rules -> desired state: selectors, canary share, TTL intent comparison."""

from tracefleet.controller.domain.rules import (
    Rule,
    canary_bucket,
    desired_for_node,
    in_canary,
)
from tracefleet.model.filters import Filters


def test_canary_subset_is_deterministic_and_proportional():
    names = [f"node-{i:04d}" for i in range(2000)]
    first = {n for n in names if in_canary(n, 10)}
    again = {n for n in names if in_canary(n, 10)}
    assert first == again
    assert 120 <= len(first) <= 280  # ~10% of 2000
    # a node's membership does not depend on the other nodes, and shares nest
    assert first <= {n for n in names if in_canary(n, 50)}
    assert all(in_canary(n, 0) and in_canary(n, 100) for n in names[:50])
    assert canary_bucket("node-0001") == canary_bucket("node-0001")


def test_desired_state_per_node():
    rules = [
        Rule("file", True, "role=db", Filters(pids=(5,))),
        Rule("exec", False),
        Rule("net", True, "role=db", expired=True),
    ]
    db = {s.name: s for s in desired_for_node(rules, "db-1", {"role": "db"})}
    web = {s.name: s for s in desired_for_node(rules, "web-1", {"role": "web"})}
    assert db["file"].enabled and db["file"].filters.pids == (5,)
    assert not db["exec"].enabled and not db["net"].enabled
    assert not any(s.enabled for s in web.values())
    assert sorted(db) == ["exec", "file", "net"]


def test_canary_rule_applies_to_selected_canary_nodes_only():
    r = Rule("file", True, "role=db", canary_percent=30)
    nodes = [f"db-{i}" for i in range(200)]
    applied = [n for n in nodes if r.applies_to(n, {"role": "db"})]
    assert applied == [n for n in nodes if in_canary(n, 30)]
    assert not any(r.applies_to(n, {"role": "web"}) for n in nodes)


def test_same_intent_ignores_expiry_but_not_scope():
    base = Rule("file", True, "role=db", expires_at=10.0)
    assert base.same_intent(base.with_changes(expires_at=99.0))
    assert not base.same_intent(base.with_changes(selector="role=web"))
    assert not base.same_intent(base.with_changes(canary_percent=10))
    assert base.with_changes(canary_percent=0).same_intent(base.with_changes(canary_percent=100))
    assert not base.same_intent(base.with_changes(expired=True))
    # two "off" rules are the same whatever their selectors
    assert Rule("file", False, "role=db").same_intent(Rule("file", True, expired=True))
