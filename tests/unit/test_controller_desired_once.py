"""A change pushed to the fleet builds one DesiredState per distinct outcome of the rules,
shared by every node with that outcome, not one per node (the per-agent cost of a push)."""

from tests.unit.test_controller_core import drain, register
from tracefleet.controller.domain.controller import Controller
from tracefleet.controller.storage.store import Store


def _desired(conn):
    return [m for m in drain(conn) if m.WhichOneof("kind") == "desired_state"][-1]


def test_one_message_per_outcome_shared_by_the_nodes():
    ctl = Controller(Store(":memory:"))
    ctl.redact_patterns = ("secret=(\\S+)",)
    conns = {}
    for i in range(40):
        role = "db" if i % 2 else "web"
        conns[f"n{i}"] = (role, register(ctl, f"n{i}", {"role": role})[1])
    for _, conn in conns.values():
        drain(conn)
    ctl.configure("file", True, "role=db", ttl=600, now=1000.0)
    got = {name: (role, _desired(conn)) for name, (role, conn) in conns.items()}
    by_role = {role: {id(m) for r, m in got.values() if r == role} for role in ("db", "web")}
    assert len(by_role["db"]) == 1 and len(by_role["web"]) == 1 and by_role["db"] != by_role["web"]
    for role, m in got.values():
        (spec,) = m.desired_state.event_sets
        assert spec.enabled == (role == "db") and m.desired_state.generation == 1
        assert spec.expires_at_unix_ns == (1600 * 10**9 if role == "db" else 0)
        assert list(m.desired_state.redact_patterns) == ["secret=(\\S+)"]
    # a canary splits the selected nodes by name: still one message per outcome, and the
    # next generation never reuses the previous one's
    ctl.configure("file", True, "role=db", canary_percent=50, now=1000.0)
    msgs = [_desired(conn) for _, conn in conns.values()]
    assert {m.desired_state.generation for m in msgs} == {2}
    on = {id(m) for m in msgs if m.desired_state.event_sets[0].enabled}
    off = {id(m) for m in msgs if not m.desired_state.event_sets[0].enabled}
    assert len(on) == 1 and len(off) == 1
    matched = set(ctl.configure("file", True, "role=db", canary_percent=50).matched_nodes)
    assert {
        n
        for n, (_, c) in conns.items()
        if ctl.desired_message(ctl.fleet.nodes[n]).desired_state.event_sets[0].enabled
    } == matched
