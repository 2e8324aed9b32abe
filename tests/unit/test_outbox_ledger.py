"""Exactly-once delivery of result batches, without daemons: the agent's bounded outbox
(numbering, window, resend, discards) against the controller's ledger (dedup by seq, group
commit to SQLite, acknowledgements after the commit), including a controller "crash" that
loses what it had applied but not committed."""

from __future__ import annotations

import random

import pytest

from tracefleet.agent.control.outbox import Outbox
from tracefleet.controller.domain.ledger import (
    MAX_COUNT,
    Ledger,
    Outcome,
    batch_problem,
)
from tracefleet.controller.storage.store import Store
from tracefleet.v1 import agent_pb2


def batch(delivered: int, dropped: int = 0, name: str = "file", events: int = 0):
    b = agent_pb2.ResultBatch(interval_start_ns=1, interval_end_ns=2)
    b.sets.add(event_set=name, delivered=delivered, dropped=dropped)
    for _ in range(events):
        b.events.add(event_set=name, syscall="openat", args={"path": {"value": "x" * 200}})
    return b


def test_outbox_numbers_batches_and_forgets_them_when_acknowledged():
    ob = Outbox("i1", max_batches=10, window=3)
    for n in range(5):
        assert ob.add(batch(n))
    assert [b.seq for b in ob.batches()] == [1, 2, 3, 4, 5]
    sent = []
    cursor = 0
    while (b := ob.next_to_send(cursor)) is not None:
        assert not ob.mark_written(b.seq)
        sent.append(b.seq)
        cursor = b.seq
    assert sent == [1, 2, 3]  # the window: 3 in flight
    assert ob.ack("other-instance", 3) == 0 and ob.ack("i1", 9) == 0  # never written: ignored
    assert ob.ack("i1", 2) == 2 and [b.seq for b in ob.batches()] == [3, 4, 5]
    assert ob.next_to_send(cursor).seq == 4
    # a new stream starts again after the last acknowledged: 3 is a resend
    b = ob.next_to_send(0)
    assert b.seq == 3 and ob.mark_written(3)


def test_outbox_never_discards_a_batch_that_was_written():
    ob = Outbox("i1", max_batches=4, window=2)
    for n in (1, 2):
        ob.add(batch(n))
    for seq in (1, 2):
        ob.mark_written(seq)  # written, then the stream broke: maybe applied
    for n in range(3, 10):
        ob.add(batch(n))
    kept = ob.batches()
    assert [b.sets[0].delivered for b in kept[:2]] == [1, 2]  # the written ones survive
    assert len(kept) == 4
    assert ob.discarded_batches == 5
    assert ob.discarded_events == sum(range(3, 8))  # the oldest never written: 3..7


def test_outbox_byte_budget_bounds_memory_and_discards_the_new_batch_if_nothing_else_can_go():
    ob = Outbox("i1", max_batches=100, max_bytes=20_000, window=1)
    big = batch(7, events=40)
    assert big.ByteSize() > 8_000
    assert ob.add(big)
    ob.mark_written(1)
    assert ob.add(batch(1, events=40))  # fits
    assert ob.add(batch(2, events=40))  # does not: the unwritten seq 2 goes
    assert ob.bytes <= 20_000 and [b.sets[0].delivered for b in ob.batches()] == [7, 2]
    huge = batch(5, events=200)
    # bigger than what is left: the unwritten batch goes first (it carried the discard of
    # the first one), then the huge one itself; the written seq 1 stays
    assert not ob.add(huge)
    assert ob.bytes <= 20_000 and [b.sets[0].delivered for b in ob.batches()] == [7]
    small = batch(3)
    assert ob.add(small)
    # the discarded batches' events are reported by the next batch kept (the small one)
    assert [(s.event_set, s.discarded) for s in small.sets] == [("file", 1 + 2 + 5)]
    assert small.lost_intervals == 3
    assert (ob.discarded_batches, ob.discarded_events) == (3, 8)


def test_batch_problem_bounds():
    assert batch_problem(batch(1)) == ""
    assert "seq" in batch_problem(agent_pb2.ResultBatch(instance_id="x", seq=0))
    assert "seq" in batch_problem(agent_pb2.ResultBatch(instance_id="x", seq=2**63))
    assert "instance_id" in batch_problem(agent_pb2.ResultBatch(instance_id="x" * 65, seq=1))
    assert "count" in batch_problem(batch(MAX_COUNT + 1))


def test_ledger_applies_once_and_acknowledges_only_what_is_committed(tmp_path):
    store = Store(str(tmp_path / "c.db"))
    led = Ledger(store.ledger())
    b1 = batch(10, 1)
    b1.instance_id, b1.seq = "i1", 1
    assert led.apply("n", b1) is Outcome.APPLIED
    assert led.committed_seq("n", "i1") == 0  # not in the store yet
    rows = led.changes()
    store.put_ledger(rows)
    assert led.committed(rows) == [("n", "i1", 1)]
    assert led.apply("n", b1) is Outcome.DUPLICATE
    legacy = batch(5)
    assert led.apply("n", legacy) is Outcome.LEGACY
    rows = led.changes()
    store.put_ledger(rows)
    assert led.committed(rows) == []  # nothing new to acknowledge
    store.close()
    again = Ledger(Store(str(tmp_path / "c.db")).ledger())
    n = again.nodes["n"]
    assert (n.sets["file"].delivered, n.sets["file"].dropped) == (15, 1)
    assert (n.applied, n.duplicate) == (2, 1)
    assert again.committed_seq("n", "i1") == 1
    assert again.apply("n", b1) is Outcome.DUPLICATE


def test_ledger_keeps_a_few_instances_per_node():
    led = Ledger(clock=iter(range(100)).__next__)
    for i in range(6):
        b = batch(1)
        b.instance_id, b.seq = f"i{i}", 1
        led.apply("n", b)
    rows = led.changes()
    assert {c[1] for c in rows.cursors} == {"i2", "i3", "i4", "i5"}
    assert led.committed_seq("n", "i0") == 0


class _NoScan(dict):  # type: ignore[type-arg]
    """Cursors that fail the test when something walks all of them."""

    def __iter__(self):
        raise AssertionError("walked every node's cursors")

    def items(self):
        raise AssertionError("walked every node's cursors")

    keys = values = items


def test_one_nodes_cursors_are_found_without_walking_the_fleets():
    """A new agent instance (every agent's first batch), a node forgotten or its rows taken
    from the store: the work is that node's cursors, not a scan of every node's (O(fleet)
    per agent: O(fleet^2) when a fleet of 10,000 connects)."""
    led = Ledger(clock=iter(range(1000)).__next__)
    led._cursors = _NoScan(led._cursors)
    for node in ("a", "b", "c"):
        for i in range(6):
            b = batch(1)
            b.instance_id, b.seq = f"{node}{i}", 1
            led.apply(node, b)
    rows = led.changes()
    assert sorted(c[1] for c in rows.cursors if c[0] == "b") == ["b2", "b3", "b4", "b5"]
    assert sorted(rows.dropped_cursors) == [(n, f"{n}{i}") for n in "abc" for i in (0, 1)]
    acks = led.committed(rows)
    assert len(acks) == 12 and led.committed_seq("c", "c5") == 1
    led.forget("a")
    assert led.committed_seq("a", "a5") == 0 and led.committed_seq("b", "b5") == 1
    b = batch(1)
    b.instance_id, b.seq = "a9", 1  # a forgotten node comes back: counted again
    assert led.apply("a", b) is Outcome.APPLIED
    led.replace_node("b", Ledger().changes())  # the store has nothing of b (another replica)
    assert led.committed_seq("b", "b5") == 0 and led.committed_seq("c", "c5") == 1


def test_store_upgrades_schema_1(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('generation', 5)")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    s = Store(str(path))
    assert s.generation() == 5 and s.ledger().set_totals == []
    assert s._db.execute("PRAGMA user_version").fetchone()[0] == 2


def test_store_adds_the_call_accounting_columns_in_place(tmp_path):
    """A database from before the call accounting keeps its totals (the new counts start
    at 0) and stores the new counts from then on."""
    import sqlite3

    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE set_totals (node TEXT NOT NULL, event_set TEXT NOT NULL, "
               "delivered INTEGER NOT NULL, dropped INTEGER NOT NULL, discarded INTEGER NOT "
               "NULL, PRIMARY KEY (node, event_set))")  # fmt: skip
    db.execute("INSERT INTO set_totals VALUES ('n', 'file', 10, 2, 1)")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    store = Store(path)
    led = Ledger(store.ledger())
    c = led.nodes["n"].sets["file"]
    assert (c.delivered, c.dropped, c.discarded, c.passed, c.lost) == (10, 2, 1, 0, 0)
    b = batch(5, 1)
    s = b.sets[0]
    s.passed, s.lost, s.lost_inflight_full, s.prefix_filtered, s.decode_errors = 9, 2, 2, 1, 0
    s.kernel_missed_entry, s.kernel_missed_exit = 4, 7
    led.apply("n", b)
    store.put_ledger(led.changes())
    store.close()
    c = Ledger(Store(path).ledger()).nodes["n"].sets["file"]
    assert (c.delivered, c.dropped, c.passed, c.lost, c.lost_inflight_full) == (15, 3, 9, 2, 2)
    assert c.prefix_filtered == 1
    assert (c.kernel_missed_entry, c.kernel_missed_exit) == (4, 7)  # columns added in place


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_outages_and_crashes_count_every_event_exactly_once(tmp_path, seed):
    """An agent producing batches, a lossy stream that breaks at random, and a controller that
    crashes at random (losing what it applied since its last commit): at the end the store
    holds every produced event exactly once, as counted or as discarded."""
    rng = random.Random(seed)
    path = str(tmp_path / "c.db")
    store = Store(path)
    led = Ledger(store.ledger())
    ob = Outbox("inst", max_batches=12, window=4)
    produced = 0
    cursor = 0
    in_flight: list[agent_pb2.ResultBatch] = []  # written, not yet read by the controller
    up = True
    passed = 0
    missed = [0, 0]  # kernel-skipped entry and exit runs, outside the identity
    for _ in range(3000):
        r = rng.random()
        if r < 0.3:
            n = rng.randrange(0, 500)
            produced += n + n // 7
            b = batch(n, n // 7, name=rng.choice(["file", "net"]))
            # the call accounting of the interval: passed = delivered + dropped + lost + ...
            s = b.sets[0]
            s.lost_inflight_full, s.lost_inflight_stale, s.lost_deleted = (
                rng.randrange(0, 9), rng.randrange(0, 3), rng.randrange(0, 2)
            )  # fmt: skip
            s.lost = s.lost_inflight_full + s.lost_inflight_stale + s.lost_deleted
            s.prefix_filtered, s.decode_errors = rng.randrange(0, 20), rng.randrange(0, 2)
            s.passed = n + n // 7 + s.lost + s.prefix_filtered + s.decode_errors
            passed += s.passed
            s.kernel_missed_entry, s.kernel_missed_exit = rng.randrange(0, 5), rng.randrange(0, 9)
            missed[0] += s.kernel_missed_entry
            missed[1] += s.kernel_missed_exit
            ob.add(b)
        elif r < 0.55 and up:
            b = ob.next_to_send(cursor)
            if b is not None:
                ob.mark_written(b.seq)
                cursor = b.seq
                copy = agent_pb2.ResultBatch()
                copy.CopyFrom(b)
                in_flight.append(copy)
        elif r < 0.75 and up and in_flight:
            b = in_flight.pop(0)
            assert batch_problem(b) == ""
            led.apply("node", b)
        elif r < 0.85 and up:
            rows = led.changes()
            store.put_ledger(rows)
            for _node, inst, seq in led.committed(rows):
                ob.ack(inst, seq)
        elif r < 0.9:  # the stream breaks: what was in flight is lost, the agent resends
            in_flight.clear()
            cursor = 0
        elif r < 0.93:  # the controller is killed: uncommitted state is gone
            in_flight.clear()
            cursor = 0
            store.close()
            store = Store(path)
            led = Ledger(store.ledger())
            up = rng.random() < 0.7
            if up:  # on Register the agent learns the last committed seq
                ob.ack("inst", led.committed_seq("node", "inst"))
        elif not up:
            up = True
            ob.ack("inst", led.committed_seq("node", "inst"))
    # the outage ends: deliver everything left
    up, in_flight, cursor = True, [], 0
    ob.add(agent_pb2.ResultBatch())  # carries discards not yet reported
    ob.ack("inst", led.committed_seq("node", "inst"))
    while len(ob):
        b = ob.next_to_send(cursor)
        assert b is not None
        ob.mark_written(b.seq)
        cursor = b.seq
        led.apply("node", b)
        rows = led.changes()
        store.put_ledger(rows)
        for _node, inst, seq in led.committed(rows):
            ob.ack(inst, seq)
    store.close()
    final = Ledger(Store(path).ledger()).nodes["node"]
    counted = sum(c.delivered + c.dropped for c in final.sets.values())
    discarded = sum(c.discarded for c in final.sets.values())
    assert ob.discarded_batches > 0, "the budget never overflowed: the test proves less"
    assert final.duplicate > 0, "no batch was ever resent: the test proves less"
    assert counted + discarded == produced
    assert discarded == ob.discarded_events
    assert final.discarded == ob.discarded_batches
    # the call accounting of discarded batches is carried, not lost: the identity holds in
    # the controller's totals, every count once
    assert sum(c.passed for c in final.sets.values()) == passed
    assert [sum(c.kernel_missed_entry for c in final.sets.values()),
            sum(c.kernel_missed_exit for c in final.sets.values())] == missed  # fmt: skip
    for c in final.sets.values():
        assert c.lost == c.lost_inflight_full + c.lost_inflight_stale + c.lost_deleted
        assert c.passed == (c.delivered + c.dropped + c.discarded + c.lost + c.prefix_filtered
                            + c.decode_errors)  # fmt: skip


def test_outbox_defaults_are_what_the_agent_runs_with_and_what_the_readme_says():
    """The budget `tracefleet-agent run` really gets (its CLI's options into its client's
    outbox), against the README's "(600 batches and 32 MiB by default)"."""
    import re

    from tests.conftest import REPO
    from tracefleet.agent import cli
    from tracefleet.agent.control.client import ControlClient

    args = cli.build_parser().parse_args(["run", "--controller", "127.0.0.1:7070", "--node", "n"])
    options = cli._client_options(args)
    assert options is not None
    outbox = ControlClient(object(), args.controller, args.node, {}, options)._outbox  # type: ignore[arg-type]
    m = re.search(r"bounded outbox \((\d+) batches and (\d+) MiB by default\)",
                  " ".join((REPO / "README.md").read_text().split()))  # fmt: skip
    assert m, "the README no longer states the outbox defaults"
    assert (outbox.max_batches, outbox.max_bytes) == (int(m[1]), int(m[2]) << 20) == (600, 32 << 20)


def test_ledger_counts_resent_batches_of_an_agent_that_came_from_another_replica():
    """Two replicas' ledgers: the agent's batches 1-3 went to A (A applied 3, its ack was
    lost), then it moved to B and resent 3 and sent 4. B applies 3 again (the double count
    across replicas that is not fixed yet) and counts it as adopted; 4 and an agent B saw from
    seq 1 are not."""
    a, b = Ledger(), Ledger()
    for seq in (1, 2, 3):
        x = batch(1)
        x.instance_id, x.seq = "moved", seq
        assert a.apply("n", x) is Outcome.APPLIED
    resent = batch(1)
    resent.instance_id, resent.seq, resent.replayed = "moved", 3, True
    assert b.apply("n", resent) is Outcome.APPLIED
    new = batch(1)
    new.instance_id, new.seq = "moved", 4
    assert b.apply("n", new) is Outcome.APPLIED
    own = batch(1)
    own.instance_id, own.seq = "own", 1
    b.apply("m", own)
    own2 = batch(1)
    own2.instance_id, own2.seq, own2.replayed = "own", 2, True  # a resend after a reconnect
    b.apply("m", own2)
    snap = b.snapshot()
    assert (snap["n"].adopted, snap["m"].adopted) == (1, 0)
    assert a.snapshot()["n"].adopted == 0
    # what the fleet counted: A's three batches and B's two, one of them A's third again
    assert a.nodes["n"].sets["file"].delivered + b.nodes["n"].sets["file"].delivered == 5


def test_a_commit_another_replica_overtook_acknowledges_nothing_and_takes_its_rows():
    """A store shared by replicas (etcd) refuses a node's rows another replica changed since:
    the controller sends no BatchAck for that node, takes the store's rows (the other
    replica's counts and cursor) and closes the stream so the agent resends; a batch the
    other replica counted is then a duplicate here."""
    import asyncio

    from tracefleet.controller.domain.controller import Controller
    from tracefleet.controller.domain.fleet import Connection
    from tracefleet.controller.storage.store import SET_ACCOUNTING, LedgerRows

    theirs = LedgerRows(
        set_totals=[("n1", "file", 70, 0, 0, *(0,) * len(SET_ACCOUNTING))],
        node_batches=[("n1", 2, 0, 0)],
        cursors=[("n1", "i1", 2, 1.0)],
    )

    class Shared(Store):
        overtaken = False

        def put_ledger(self, rows: LedgerRows) -> set[str]:
            if self.overtaken:
                return {r[0] for r in rows.node_batches}
            return super().put_ledger(rows)

        def node_ledgers(self, names: list[str]) -> dict[str, LedgerRows]:
            return dict.fromkeys(names, theirs) if self.overtaken else {}

    async def scenario() -> None:
        store = Shared(":memory:")
        ctl = Controller(store)
        conn = Connection()
        node = ctl.on_register(agent_pb2.Register(node_name="n1", instance_id="i1"), conn)
        conn.take()
        first = batch(5)
        first.instance_id, first.seq = "i1", 1
        assert ctl.on_batch(node, first) is Outcome.APPLIED
        store.overtaken = True  # meanwhile another replica counted seq 1 and 2
        assert ctl.commit() == 0
        sent = conn.take()
        assert sent == [None]  # the stream is closed; no BatchAck went out
        assert ctl.ledger.committed_seq("n1", "i1") == 2
        assert ctl.ledger.snapshot()["n1"].sets["file"].delivered == 70
        again = batch(5)
        again.instance_id, again.seq = "i1", 2
        assert ctl.on_batch(node, again) is Outcome.DUPLICATE

    asyncio.run(scenario())


def test_nodes_registering_together_have_their_ledgers_read_in_one_request():
    """A shared store: each registering node's ledger is read again (another replica may
    have counted its batches), and the nodes registering within Timings.commit in one
    read (a failover moves hundreds of agents at once: a read each was one etcd request
    each); the rows read are what the controller counts from. A controller's own database
    reads nothing."""
    import asyncio

    from tracefleet.controller.domain.controller import Controller
    from tracefleet.controller.domain.fleet import Connection
    from tracefleet.controller.storage.store import SET_ACCOUNTING, LedgerRows

    reads: list[list[str]] = []

    class Shared(Store):
        shared = True

        def node_ledgers(self, names: list[str]) -> dict[str, LedgerRows]:
            reads.append(list(names))
            return {
                n: LedgerRows(
                    set_totals=[(n, "file", 10 * i, 0, 0, *(0,) * len(SET_ACCOUNTING))],
                    node_batches=[(n, i, 0, 0)],
                    cursors=[(n, "i1", i, 1.0)],
                )
                for i, n in enumerate(names, 1)
            }

    async def register(ctl: Controller, name: str) -> None:
        await ctl.register(agent_pb2.Register(node_name=name, instance_id="i1"), Connection())

    async def scenario() -> None:
        ctl = Controller(Shared(":memory:"))
        await asyncio.gather(*(register(ctl, f"n{i}") for i in range(1, 6)))
        assert reads == [["n1", "n2", "n3", "n4", "n5"]]
        assert ctl.ledger.committed_seq("n3", "i1") == 3
        assert ctl.ledger.snapshot()["n3"].sets["file"].delivered == 30
        await register(ctl, "n6")  # alone, later: a read of its own
        assert reads[1:] == [["n6"]]
        own = Controller(Store(":memory:"))
        await register(own, "n1")  # its own database: nothing read, registered at once
        assert "n1" in own.fleet.nodes

    asyncio.run(scenario())
