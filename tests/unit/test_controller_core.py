"""The controller's state machine without gRPC: generations, idempotency, TTL, restarts."""

import pytest

from tracefleet.controller.domain.controller import ConfigError, Controller
from tracefleet.controller.domain.fleet import Connection, State
from tracefleet.controller.storage.store import Store
from tracefleet.v1 import agent_pb2


def register(ctl, name, labels, applied=0, sets=("file", "exec", "net", "vfs")):
    conn = Connection()
    node = ctl.on_register(
        agent_pb2.Register(
            node_name=name, labels=labels, applied_generation=applied, event_sets=list(sets)
        ),
        conn,
    )
    return node, conn


def drain(conn):
    return conn.take()


def desired_sets(msgs):
    states = [m.desired_state for m in msgs if m.WhichOneof("kind") == "desired_state"]
    assert states, "no DesiredState sent"
    last = states[-1]
    return last.generation, {s.name: s.enabled for s in last.event_sets}


def test_enable_reaches_matching_nodes_only_and_is_idempotent():
    ctl = Controller(Store(":memory:"))
    _, db = register(ctl, "db-1", {"role": "db"})
    _, web = register(ctl, "web-1", {"role": "web"})
    assert desired_sets(drain(db)) == (0, {})
    drain(web)
    res = ctl.configure("file", True, "role=db")
    assert (res.generation, res.changed, res.matched_nodes) == (1, True, ["db-1"])
    assert desired_sets(drain(db)) == (1, {"file": True})
    assert desired_sets(drain(web)) == (1, {"file": False})
    again = ctl.configure("file", True, " role=db ")
    assert (again.generation, again.changed) == (1, False)
    assert drain(db) == [] and ctl.generation == 1
    ctl.configure("file", False)
    assert desired_sets(drain(db)) == (2, {"file": False})


def test_unknown_event_set_lists_the_known_ones():
    ctl = Controller(Store(":memory:"))
    with pytest.raises(ConfigError, match="unknown event set 'fiel'; known event sets: exec, file"):
        ctl.configure("fiel", True)
    register(ctl, "n", {}, sets=("file", "custom"))
    # an agent cannot add names to the controller's registry (issue 15)
    with pytest.raises(ConfigError, match="unknown event set 'custom'"):
        ctl.configure("custom", True)
    with pytest.raises(ConfigError, match="selector"):
        ctl.configure("file", True, "role")
    with pytest.raises(ConfigError, match="canary"):
        ctl.configure("file", True, canary_percent=101)
    assert ctl.generation == 0


def test_ttl_expiry_switches_off_and_bumps_generation():
    ctl = Controller(Store(":memory:"))
    _, conn = register(ctl, "db-1", {"role": "db"})
    res = ctl.configure("file", True, "role=db", ttl=5, now=1000.0)
    assert res.rule.expires_at == 1005.0
    drain(conn)
    assert ctl.expire(1004.0) == []
    assert ctl.expire(1005.5) == ["file"]
    assert ctl.generation == res.generation + 1
    assert ctl.rules["file"].expired and not ctl.rules["file"].active
    assert desired_sets(drain(conn)) == (ctl.generation, {"file": False})
    assert ctl.expire(2000.0) == []  # once


def test_repeat_enable_restarts_ttl_without_new_generation():
    ctl = Controller(Store(":memory:"))
    first = ctl.configure("file", True, ttl=5, now=1000.0)
    again = ctl.configure("file", True, ttl=5, now=1003.0)
    assert not again.changed and again.generation == first.generation
    assert ctl.rules["file"].expires_at == 1008.0
    assert ctl.expire(1006.0) == []


def test_state_survives_restart(tmp_path):
    path = str(tmp_path / "c.db")
    store = Store(path)
    ctl = Controller(store)
    register(ctl, "db-1", {"role": "db"})
    ctl.configure("file", True, "role=db", canary_percent=50)
    ctl.configure("exec", True, "role=web")
    ctl.flush()
    store.close()
    ctl2 = Controller(Store(path))
    assert ctl2.generation == 2
    assert ctl2.rules["file"].selector == "role=db" and ctl2.rules["file"].canary_percent == 50
    assert "db-1" in ctl2.fleet.nodes  # known before it reconnects
    assert ctl2.fleet.nodes["db-1"].conn is None
    assert ctl2.configure("net", True).generation == 3


def test_agent_ahead_of_controller_moves_generation_past_it():
    ctl = Controller(Store(":memory:"))
    _, other = register(ctl, "a", {})
    drain(other)
    _, conn = register(ctl, "b", {}, applied=17)
    assert ctl.generation == 18
    assert desired_sets(drain(conn))[0] == 18
    assert desired_sets(drain(other))[0] == 18


def test_acks_stale_and_replaced_streams():
    ctl = Controller(Store(":memory:"), stale_after=5.0)
    node, conn = register(ctl, "db-1", {})
    ctl.configure("file", True)
    assert node.applied_generation < ctl.generation
    ctl.on_ack(node, agent_pb2.Ack(generation=ctl.generation))
    assert node.applied_generation == ctl.generation
    assert ctl.fleet.state(node) == State.CONNECTED
    assert ctl.fleet.state(node, now=node.last_seen + 6) == State.STALE
    _, conn2 = register(ctl, "db-1", {})  # the agent restarted before the old stream died
    assert conn.closed and not conn2.closed
    ctl.on_disconnect(node, conn)  # the old stream ending does not detach the new one
    assert node.conn is conn2
    assert ctl.fleet.connected() == [node] and ctl.fleet.disconnected() == []
    ctl.on_disconnect(node, conn2)
    assert node.conn is None and ctl.fleet.state(node) == State.DISCONNECTED
    assert ctl.fleet.connected() == [] and ctl.fleet.disconnected() == [node]
    assert ctl.fleet.connected_count() == 0


def test_sampled_events_reach_matching_followers_and_trigger_sampling():
    from tracefleet.controller.domain.events import Follower
    from tracefleet.v1 import types_pb2

    ctl = Controller(Store(":memory:"))
    node, conn = register(ctl, "db-1", {})
    drain(conn)
    f = Follower(event_sets=frozenset({"file"}), pids=frozenset({7}))
    ctl.hub.add(f)
    ctl.refresh_sampling()
    (msg,) = drain(conn)
    assert list(msg.sample_request.event_sets) == ["file"] and list(msg.sample_request.pids) == [7]
    assert msg.sample_request.lease.seconds > 0
    batch = agent_pb2.ResultBatch(
        events=[
            types_pb2.Event(event_set="file", pid=7, syscall="openat"),
            types_pb2.Event(event_set="file", pid=8),
            types_pb2.Event(event_set="exec", pid=7),
        ]
    )
    ctl.on_batch(node, batch)
    got = f.queue.get_nowait()
    assert (got.node, got.syscall) == ("db-1", "openat") and f.queue.empty()
    ctl.hub.remove(f)
    ctl.refresh_sampling()
    (stop,) = drain(conn)
    assert stop.sample_request.lease.seconds == 0
    ctl.refresh_sampling()  # nobody follows, no lease out: nothing sent
    assert drain(conn) == []
    # a node registering while someone follows gets its lease at once, and loses it when
    # the follower goes, though no refresh ran in between
    ctl.hub.add(f)
    _, conn2 = register(ctl, "db-2", {})
    assert [m.sample_request.lease.seconds > 0 for m in drain(conn2) if m.HasField(
        "sample_request")] == [True]  # fmt: skip
    ctl.hub.remove(f)
    ctl.refresh_sampling()
    assert [m.sample_request.lease.seconds for m in drain(conn2)] == [0]


def test_user_event_sets_validated_bounded_and_sent_to_agents():
    """`tracefleet enable user:NAME` (issue 18): a valid name becomes a rule like any set;
    bad names and more than MAX_USER_SETS user sets are refused with the fix."""
    from tracefleet.controller.domain.rules import MAX_USER_SETS

    ctl = Controller(Store(":memory:"))
    _, conn = register(ctl, "web-1", {"role": "web"})
    drain(conn)
    res = ctl.configure("user:checkout_latency", True, "role=web", ttl=60)
    assert res.matched_nodes == ["web-1"] and res.rule.expires_at is not None
    assert desired_sets(drain(conn))[1] == {"user:checkout_latency": True}
    for bad in ("user:", "user:9x", "user:a-b", "user:a/../b"):
        with pytest.raises(ConfigError, match=r"bad user event set .*\[A-Za-z0-9_\]"):
            ctl.configure(bad, True)
    for i in range(MAX_USER_SETS - 1):
        ctl.configure(f"user:ev{i}", True)
    with pytest.raises(ConfigError, match=f"the limit is {MAX_USER_SETS}"):
        ctl.configure("user:one_too_many", True)
    ctl.configure("user:checkout_latency", False)  # an existing one may still change
    assert desired_sets(drain(conn))[1]["user:checkout_latency"] is False


def test_a_stream_writer_gets_what_was_sent_before_the_close_then_the_close():
    import asyncio

    async def scenario():
        conn = Connection()
        waiter = asyncio.ensure_future(conn.wait())
        await asyncio.sleep(0)
        assert not waiter.done()  # nothing sent yet: the writer sleeps
        conn.send("a")
        conn.send("b")
        first = await waiter
        conn.send("c")
        conn.close()
        conn.send("after the close")
        return first, await conn.wait(), conn.take()

    assert asyncio.run(scenario()) == (["a", "b"], ["c", None], [])
