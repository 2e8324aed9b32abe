"""Fewer messages per agent (fleet scale): BatchAcks merged per node, idle agents reporting
at the controller's idle gap rather than every interval, a large fleet's batches spaced to
the rate the controller merges."""

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from tests.loadgen import SyntheticEngine
from tests.unit.controller_helpers import InProcessController, wait_until
from tests.unit.test_controller_core import drain
from tracefleet.agent.control.client import ClientOptions, ControlClient
from tracefleet.controller.domain import controller as controller_mod
from tracefleet.controller.domain.controller import Controller, Timings
from tracefleet.controller.domain.events import Follower
from tracefleet.controller.domain.fleet import Connection
from tracefleet.controller.storage.store import Store
from tracefleet.v1 import agent_pb2


def _acks(conn):
    return [m.batch_ack.seq for m in drain(conn) if m.WhichOneof("kind") == "batch_ack"]


def test_batch_acks_are_merged_per_node_and_cover_the_highest_committed_seq():
    ctl = Controller(Store(":memory:"), timings=Timings(ack_every=3600.0, ack_burst=8))
    conn = Connection()
    reg = agent_pb2.Register(node_name="n1", instance_id="i1", event_sets=["file"])
    node = ctl.on_register(reg, conn)
    assert _acks(conn) == [0]  # the first message of a stream is never held back

    def batch(seq):
        b = agent_pb2.ResultBatch(instance_id="i1", seq=seq)
        b.sets.add(event_set="file", delivered=seq)
        ctl.on_batch(node, b)
        ctl.commit()

    batch(1)
    assert _acks(conn) == [1]  # no ack for a while: sent at once
    for seq in range(2, 6):
        batch(seq)
    assert _acks(conn) == []  # held back: at most one per ack_every
    assert ctl.send_due_acks() == 0 and _acks(conn) == []
    assert ctl.send_due_acks(force=True) == 1
    assert _acks(conn) == [5]  # one ack, cumulative: the highest committed seq
    for seq in range(6, 14):  # ack_burst batches waiting: acked without waiting
        batch(seq)
    assert _acks(conn) == [13]
    # what was acknowledged is exactly what the store holds
    totals = ctl.store.ledger().set_totals
    # node, set, delivered, then dropped, discarded and the call accounting: all zero here
    assert [t[:3] for t in totals] == [("n1", "file", sum(range(1, 14)))]
    assert not any(totals[0][3:]), totals
    assert ctl.ledger.committed_seq("n1", "i1") == 13


def test_an_agent_with_a_small_ack_window_is_never_kept_waiting():
    # an outbox of 3 batches (window 2) would fill, and discard, while an ack is held back
    ctl = Controller(Store(":memory:"), timings=Timings(ack_every=3600.0, ack_burst=8))
    conn = Connection()
    reg = agent_pb2.Register(node_name="n2", instance_id="i2", ack_window=2)
    node = ctl.on_register(reg, conn)
    drain(conn)
    for seq in range(1, 5):
        ctl.on_batch(node, agent_pb2.ResultBatch(instance_id="i2", seq=seq))
        ctl.commit()
        assert _acks(conn) == [seq]


@contextlib.contextmanager
def _agent(
    ctl: InProcessController, name: str, seed: int, interval: float = 0.05
) -> Iterator[ControlClient]:
    """A real control client (synthetic engine, 50 ms interval) connected to ``ctl``."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    client = ControlClient(
        SyntheticEngine(rate=100, seed=seed),
        ctl.address,
        name,
        {"role": "db"},
        ClientOptions(interval=interval, offload_engine_calls=False, agent_version="test"),
    )
    t = threading.Thread(target=loop.run_until_complete, args=(client.run(stop),), daemon=True)
    t.start()
    try:
        yield client
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(timeout=20)
        ctl.stop()


def test_an_idle_agent_reports_at_the_controllers_idle_gap_and_resumes_when_enabled():
    ctl = InProcessController(stale_after=300.0)  # idle gap: min(300 / 3, 30 s cap) = 30 s
    with _agent(ctl, "idle-1", 3) as client:
        node = wait_until(lambda: ctl.controller.fleet.nodes.get("idle-1"), what="register")
        wait_until(lambda: client.applied_generation == 0 and client.stats.acks, what="ack")
        assert ctl.controller.idle_batch_interval == 30.0
        # 20 intervals (50 ms) pass while nothing is enabled: no batch is sent in them (the
        # agent sleeps through them, up to the idle gap)
        sent = client.stats.batches_sent
        time.sleep(20 * 0.05 + 0.2)
        assert client.stats.batches_sent == sent, "an idle agent sent batches every interval"
        # enabled: a batch every interval again at once, not after the 30 s idle gap it
        # was asleep for, and the controller gets its events
        res = ctl.call(ctl.controller.configure, "file", True, "role=db")
        wait_until(lambda: node.applied_generation == res.generation, what="enable acked")
        wait_until(lambda: client.stats.batches_sent >= sent + 5, timeout=10.0,
                   what="batches resume, well before the idle gap")  # fmt: skip
        assert client.stats.idle_ticks >= 20  # the intervals slept through are counted
        wait_until(
            lambda: ctl.controller.ledger.snapshot()["idle-1"].sets.get("file"),
            what="file events counted",
        )


def _pace(conn):
    (ack,) = [m.batch_ack for m in drain(conn) if m.WhichOneof("kind") == "batch_ack"]
    return ack.pace.ToNanoseconds() / 1e9 if ack.HasField("pace") else None


@pytest.mark.parametrize(("agents", "pace"), [(2, 0.5), (8, 2.0), (400, 30.0)])
def test_a_fleet_larger_than_the_batch_rate_is_told_to_space_its_batches(
    monkeypatch: pytest.MonkeyPatch, agents: int, pace: float
):
    # 10,000 agents at a batch a second each: the control benchmark's fleet never converged.
    # The controller spreads the fleet's batches to max_batch_rate a second in total (here
    # 4), never further apart than the idle gap (liveness: stale_after / 3, here 30 s). A
    # pace shorter than an agent's interval changes nothing there.
    monkeypatch.setattr(controller_mod, "PACE_REFRESH", 0.0)  # follow every (dis)connect
    for rate, want in ((4.0, pace), (0.0, None)):  # 0: no pace at all
        ctl = Controller(Store(":memory:"), stale_after=300.0, max_batch_rate=rate)
        for i in range(agents):
            ctl.on_register(agent_pb2.Register(node_name=f"n{i}", instance_id="i"), Connection())
        last = Connection()  # the fleet as the ack of one more registration sees it
        ctl.on_register(agent_pb2.Register(node_name="last", instance_id="i"), last)
        assert _pace(last) == want


def test_a_fleet_too_large_for_the_rate_at_the_idle_gap_is_named_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    # The pace stops at the idle gap (liveness): past it the fleet sends more than the rate,
    # which no agent can be told to fix; the operator is, once per crossing.
    monkeypatch.setattr(controller_mod, "PACE_REFRESH", 0.0)

    def warnings(stale_after: float, agents: int, quiet_until: int) -> list[str]:
        caplog.clear()
        ctl = Controller(Store(":memory:"), stale_after=stale_after, max_batch_rate=4.0)
        with caplog.at_level("WARNING", logger="tracefleet.controller"):
            for i in range(agents):
                reg = agent_pb2.Register(node_name=f"n{i}", instance_id="i")
                ctl.on_register(reg, Connection())
                if i + 1 == quiet_until:  # within the rate so far
                    assert not [r for r in caplog.records if "max-batch-rate" in r.message]
        return [r.message for r in caplog.records if "max-batch-rate" in r.message]

    # idle gap 20 s: 80 agents are 4 a second; the 82nd registration sees 81 (4.05 a second)
    warned = warnings(60.0, 140, quiet_until=80)
    assert len(warned) == 1, warned  # once per crossing, not per registration
    assert warned[0].startswith("81 connected agents send 4.0 result batches"), warned[0]
    # 81 / 4 = 20.25 s of idle gap: --stale-after 3 x 20.25 = 60.75 s
    assert warned[0].endswith("raise --stale-after to at least 61 s, or --max-batch-rate to 5")
    # the idle gap at its 30 s cap: 122 agents need 30.5 s, which no --stale-after gives
    (warned,) = warnings(300.0, 140, quiet_until=121)
    assert warned.startswith("122 connected agents"), warned
    assert warned.endswith(": raise --max-batch-rate to 5"), warned


def test_a_change_does_not_make_every_agent_send_a_batch_at_once():
    # A change reaches the whole fleet at once: an agent must keep its own tick grid (its
    # batch at its next interval), or every agent's batch would follow the change together
    # and compete with the fleet's acks.
    ctl = InProcessController(stale_after=300.0)
    with _agent(ctl, "grid-1", 5, interval=2.0) as client:
        node = wait_until(lambda: ctl.controller.fleet.nodes.get("grid-1"), what="register")
        res = ctl.call(ctl.controller.configure, "file", True, "role=db")
        wait_until(lambda: node.applied_generation == res.generation, what="enable acked")
        sent = client.stats.batches_sent
        wait_until(lambda: client.stats.batches_sent > sent, what="a batch (a tick)")
        ticks, sent = client.stats.ticks, client.stats.batches_sent
        res = ctl.call(ctl.controller.configure, "exec", True, "role=db")  # mid-interval
        wait_until(lambda: node.applied_generation == res.generation, what="change acked")
        time.sleep(0.2)
        assert (client.stats.ticks, client.stats.batches_sent) == (ticks, sent), (
            "the change made the agent tick and send at once"
        )
        wait_until(lambda: client.stats.batches_sent > sent, what="its next interval's batch")


def test_an_agent_keeps_the_controllers_pace_while_on_and_every_interval_when_followed():
    ctl = InProcessController(stale_after=300.0, max_batch_rate=2.0)  # 1 agent: 0.5 s apart
    with _agent(ctl, "paced-1", 4) as client:
        node = wait_until(lambda: ctl.controller.fleet.nodes.get("paced-1"), what="register")
        res = ctl.call(ctl.controller.configure, "file", True, "role=db")
        wait_until(lambda: node.applied_generation == res.generation, what="enable acked")
        wait_until(lambda: client._pace == 0.5, what="the pace, with a BatchAck")
        # 40 intervals of 50 ms: ~4 batches at the pace of 0.5 s, not 40
        ticks, sent = client.stats.ticks, client.stats.batches_sent
        wait_until(lambda: client.stats.ticks >= ticks + 40, what="40 intervals")
        paced = client.stats.batches_sent - sent
        assert 1 <= paced <= 8, f"{paced} batches in 40 intervals at a 0.5 s pace"
        assert client.stats.paced_ticks >= 30
        # someone follows the node's events: every interval, for prompt events
        f = Follower(event_sets=frozenset({"file"}), pids=frozenset())

        def follow() -> None:
            ctl.controller.hub.add(f)
            ctl.controller.refresh_sampling()

        ctl.call(follow)
        wait_until(lambda: client._lease is not None, what="sampling lease")
        ticks, sent = client.stats.ticks, client.stats.batches_sent
        wait_until(lambda: client.stats.ticks >= ticks + 20, what="20 intervals")
        assert client.stats.batches_sent - sent >= 15, "a followed node kept the fleet's pace"
        # the counts are whole: every event the engine made reached the ledger
        ctl.call(lambda: (ctl.controller.hub.remove(f), ctl.controller.refresh_sampling()))
        ctl.call(ctl.controller.configure, "file", False, "role=db")
        engine = client.engine
        assert isinstance(engine, SyntheticEngine)
        wait_until(lambda: not engine.enabled(), what="disabled")

        def counted() -> bool:
            made = engine.totals()["file"].delivered
            return ctl.controller.ledger.snapshot()["paced-1"].sets["file"].delivered == made

        wait_until(counted, what="every event counted")
