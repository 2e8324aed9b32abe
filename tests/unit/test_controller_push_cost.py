"""What a change costs the controller per connected agent: one write of a message built and
serialized once per outcome of the rules (no per-node hashing of the rules, no canary hash
for a rule without a canary), and node-record saves that do not encode again what did not
change."""

import json

from tests.unit.test_controller_core import drain, register
from tracefleet.controller.domain import rules as rules_mod
from tracefleet.controller.domain.controller import Controller
from tracefleet.controller.domain.fleet import status_pbs
from tracefleet.controller.domain.rules import Rule
from tracefleet.controller.domain.wire import WIRE
from tracefleet.controller.storage.store import Store
from tracefleet.v1 import agent_pb2, types_pb2


def _fleet(n):
    ctl = Controller(Store(":memory:"))
    conns = [register(ctl, f"n{i:04d}", {"role": "db" if i % 2 else "web"})[1] for i in range(n)]
    for c in conns:
        drain(c)
    return ctl, conns


def test_a_push_does_not_hash_the_rules_or_the_node_names_per_node(monkeypatch):
    hashes = {"rule": 0, "canary": 0}
    rule_hash = Rule.__hash__
    bucket = rules_mod.canary_bucket

    def counting_hash(self):
        hashes["rule"] += 1
        return rule_hash(self)

    def counting_bucket(name):
        hashes["canary"] += 1
        return bucket(name)

    monkeypatch.setattr(Rule, "__hash__", counting_hash)
    monkeypatch.setattr(rules_mod, "canary_bucket", counting_bucket)
    per_fleet = {}
    for n in (20, 200):
        ctl, conns = _fleet(n)
        ctl.configure("exec", True, "role=web")
        hashes.update(rule=0, canary=0)
        ctl.configure("file", True, "role=db")
        assert all(drain(c) for c in conns)  # every node got its state
        per_fleet[n] = dict(hashes)
    assert per_fleet[200]["rule"] == per_fleet[20]["rule"], per_fleet
    assert per_fleet[200]["canary"] == 0, per_fleet  # no canary: no sha256 per node


def test_one_serialization_per_outcome_written_to_every_stream():
    ctl, conns = _fleet(50)
    ctl.configure("file", True, "role=db")
    msgs = [drain(c)[-1] for c in conns]
    wire = [WIRE.serialize(m) for m in msgs]  # what the AgentService writes per stream
    on = [w for m, w in zip(msgs, wire, strict=True) if m.desired_state.event_sets[0].enabled]
    off = [w for m, w in zip(msgs, wire, strict=True) if not m.desired_state.event_sets[0].enabled]
    assert len(on) == len(off) == 25
    assert all(w is on[0] for w in on) and all(w is off[0] for w in off)
    assert on[0] == msgs[1].SerializeToString() and off[0] == msgs[0].SerializeToString()
    # the registry lets go of older generations' messages
    before = len(WIRE)
    for i in range(40):
        ctl.configure("file", True, "role=db" if i % 2 else "role=web")
    assert len(WIRE) - before <= 8 * 2


def _record_dumps(monkeypatch) -> list:
    """Every object json.dumps encodes from now on (until monkeypatch.undo())."""
    encoded = []
    dumps = json.dumps

    def recording(obj, *a, **k):
        encoded.append(obj)
        return dumps(obj, *a, **k)

    monkeypatch.setattr(json, "dumps", recording)
    return encoded


def test_node_record_saves_do_not_encode_the_capabilities_again(monkeypatch):
    ctl, _ = _fleet(30)
    ctl.flush()
    encoded = _record_dumps(monkeypatch)
    for _, node in sorted(ctl.fleet.nodes.items()):
        ack = agent_pb2.Ack(generation=1, statuses=[types_pb2.SetStatus(name="file")])
        ctl.on_ack(node, ack)
    ctl.flush()
    assert not [o for o in encoded if isinstance(o, dict) and "capabilities_json" in o]
    assert any(isinstance(o, list) and o and "attached" in o[0] for o in encoded)  # statuses
    monkeypatch.undo()
    stored = {r.name: r for r in ctl.store.nodes()}
    for name, node in ctl.fleet.nodes.items():
        assert stored[name].info == node.info and stored[name].applied_generation == 1
        assert node.info_json() == json.dumps(node.info, sort_keys=True)


def test_acks_with_the_same_statuses_are_encoded_once_for_every_node(monkeypatch):
    """1,000 agents acking a change with the same statuses: the node-record saves encode
    those statuses once (not once per node), and WatchAcks/GetStatus get the same values."""
    ctl, _ = _fleet(40)
    ctl.flush()
    encoded = _record_dumps(monkeypatch)
    same = [types_pb2.SetStatus(name="file", enabled=True, attached=True, strategy="exit-retry"),
            types_pb2.SetStatus(name="exec")]  # fmt: skip
    odd = [types_pb2.SetStatus(name="file", enabled=True, error="verifier: refused")]
    nodes = [node for _, node in sorted(ctl.fleet.nodes.items())]
    for i, node in enumerate(nodes):
        ctl.on_ack(node, agent_pb2.Ack(generation=1, statuses=odd if i == 7 else same))
    ctl.flush()
    status_lists = [o for o in encoded if isinstance(o, list) and o and "attached" in o[0]]
    assert len(status_lists) == 2, len(status_lists)  # one per distinct list, not per node
    monkeypatch.undo()
    stored = {r.name: r for r in ctl.store.nodes()}
    for i, node in enumerate(nodes):
        want = odd if i == 7 else same
        assert status_pbs(node.info) == want
        assert stored[node.name].info == node.info
        assert stored[node.name].info["statuses"][0]["enabled"] is True
        assert node.info_json() == json.dumps(node.info, sort_keys=True)
    assert status_pbs(nodes[7].info)[0].error == "verifier: refused"


def test_status_of_selected_nodes_copies_only_their_ledger(monkeypatch):
    """GetStatus of a selector copies the counts of the nodes it selects, not the fleet's."""
    import asyncio

    from tracefleet.controller.api.control_api import ControlService
    from tracefleet.controller.domain.ledger import SetCounts
    from tracefleet.v1 import control_pb2

    ctl, _ = _fleet(30)
    for i, (_, node) in enumerate(sorted(ctl.fleet.nodes.items())):
        batch = agent_pb2.ResultBatch(instance_id="i", seq=1)
        batch.sets.add(event_set="file", delivered=i + 1)
        batch.sets.add(event_set="exec", delivered=1)
        ctl.on_batch(node, batch)
    copies = []
    copy = SetCounts.copy
    monkeypatch.setattr(SetCounts, "copy", lambda self: copies.append(self) or copy(self))
    svc = ControlService(ctl)
    req = control_pb2.GetStatusRequest(selector="node=n0007")
    resp = asyncio.run(svc.GetStatus(req, None))
    assert [n.name for n in resp.nodes] == ["n0007"]
    totals = {t.event_set: t.delivered for t in resp.nodes[0].totals}
    assert totals == {"exec": 1, "file": 8}
    assert len(copies) == 2, len(copies)  # n0007's two sets, not 60
    whole = asyncio.run(svc.GetStatus(control_pb2.GetStatusRequest(), None))
    assert len(whole.nodes) == 30 and whole.nodes[29].totals[1].delivered == 30


def test_acks_of_one_change_are_checked_once_per_distinct_status_list(monkeypatch):
    """1,000 agents acking one change with the same statuses: the statuses are checked and
    keyed once, not once per Ack; an Ack naming a set the controller does not know is still
    checked (and counted) every time, and every node keeps what it reported."""
    from tracefleet.controller.domain.limits import Limits

    ctl, _ = _fleet(40)
    checks = []
    statuses = Limits.statuses
    monkeypatch.setattr(Limits, "statuses", lambda self, st, node: checks.append(node)
                        or statuses(self, st, node))  # fmt: skip
    same = [types_pb2.SetStatus(name="file", enabled=True, attached=True, strategy="exit-retry"),
            types_pb2.SetStatus(name="exec")]  # fmt: skip
    odd = [types_pb2.SetStatus(name="file"), types_pb2.SetStatus(name="bogus", enabled=True)]
    nodes = [node for _, node in sorted(ctl.fleet.nodes.items())]
    refused = ctl.limits.refusals.snapshot().get("agent_unknown_event_set", 0)
    for gen in (1, 2):
        for i, node in enumerate(nodes):
            ctl.on_ack(node, agent_pb2.Ack(generation=gen, statuses=odd if i < 2 else same))
    # per generation: the first Ack of the shared list, and both Acks with an unknown set
    assert sorted(checks) == sorted(["n0002", "n0002", "n0000", "n0001", "n0000", "n0001"])
    assert ctl.limits.refusals.snapshot()["agent_unknown_event_set"] == refused + 4
    for i, node in enumerate(nodes):
        assert node.applied_generation == 2
        assert status_pbs(node.info) == (odd[:1] if i < 2 else same)
    assert nodes[5].info["statuses"] is nodes[39].info["statuses"]


def test_watch_acks_does_not_copy_the_statuses_per_node(monkeypatch):
    """A WatchAcks message of 40 acks with the same statuses merges their one serialized
    form into each NodeAck; a node whose statuses came from the database (not shared) still
    shows them."""
    from tracefleet.controller.api import control_api
    from tracefleet.controller.api.control_api import ControlService

    ctl, _ = _fleet(40)
    same = [types_pb2.SetStatus(name="file", enabled=True, attached=True, strategy="exit-retry"),
            types_pb2.SetStatus(name="exec")]  # fmt: skip
    nodes = [node for _, node in sorted(ctl.fleet.nodes.items())]
    for node in nodes:
        ctl.on_ack(node, agent_pb2.Ack(generation=1, statuses=same))
    nodes[3].info["statuses"] = [dict(name="net", enabled=True, attached=False,
                                      strategy="", error="refused")]  # fmt: skip
    copies = []
    pbs = control_api.status_pbs
    monkeypatch.setattr(control_api, "status_pbs", lambda info: copies.append(info) or pbs(info))
    watch = ctl.acks.add(1, None, ctl.fleet.nodes)
    resp = ControlService(ctl)._acks_pb(watch, watch.take())
    assert len(copies) == 1, len(copies)  # only the node whose statuses are not shared
    assert resp.applied_count == 40 and len(resp.nodes) == 40
    for n in resp.nodes:
        if n.name == "n0003":
            assert [(s.name, s.enabled, s.error) for s in n.statuses] == [("net", True, "refused")]
        else:
            assert list(n.statuses) == same and n.applied_generation == 1 and n.state == 2


def test_node_record_saves_after_acks_do_not_encode_the_labels_again(monkeypatch):
    """A change acked by every node saves every node's record: the labels, which an ack
    does not change, are not encoded again; a node that registers again with new labels
    has them saved."""
    ctl, _ = _fleet(30)
    ctl.flush()
    encoded = _record_dumps(monkeypatch)
    nodes = [node for _, node in sorted(ctl.fleet.nodes.items())]
    for node in nodes:
        ctl.on_ack(node, agent_pb2.Ack(generation=1, statuses=[types_pb2.SetStatus(name="file")]))
    ctl.flush()
    assert not [o for o in encoded if isinstance(o, dict) and "role" in o], encoded
    monkeypatch.undo()
    node, _ = register(ctl, "n0004", {"role": "cache", "zone": "b"})
    ctl.flush()
    stored = {r.name: r for r in ctl.store.nodes()}
    assert stored["n0004"].labels == {"role": "cache", "zone": "b"}
    for name, node in ctl.fleet.nodes.items():
        assert stored[name].labels == node.labels and stored[name].info == node.info
