"""The agent's controller client against an in-process controller, with SyntheticEngine."""

import threading
import time

import pytest

from tests.conftest import scaled
from tests.loadgen import SyntheticEngine
from tests.unit.controller_helpers import InProcessController, wait_until
from tracefleet.agent.capture.engine import Aggregates, EventSetConfig, SetAggregate
from tracefleet.agent.control.client import (
    ClientOptions,
    ControlClient,
    _batch_pb,
    _strategies,
    first_controller,
    run_agent,
)
from tracefleet.v1 import agent_pb2, agent_pb2_grpc, types_pb2

FAST = ClientOptions(interval=0.1, backoff_initial=0.05, backoff_max=0.3, agent_version="test")


@pytest.fixture
def controller():
    c = InProcessController()
    yield c
    c.stop()


def start_agent(address, name, labels, engine, options=FAST):
    stop = threading.Event()
    result = {}

    def target():
        result["stats"] = run_agent(engine, address, name, labels, stop, options)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return stop, t, result


def test_agent_applies_acks_reports_and_stays_static_without_controller(controller):
    engine = SyntheticEngine(rate=200, seed=1)
    stop, t, result = start_agent(controller.address, "db-1", {"role": "db"}, engine)
    try:
        node = wait_until(lambda: controller.controller.fleet.nodes.get("db-1"), what="register")
        assert node.labels == {"role": "db"}
        assert [s["strategy"] for s in node.info["strategies"]] == ["synthetic"] * 4
        res = controller.call(controller.controller.configure, "file", True, "role=db")
        wait_until(lambda: node.applied_generation == res.generation, what="ack")
        assert engine.enabled() == ["file"]
        assert any(s["name"] == "file" and s["attached"] for s in node.info["statuses"])
        wait_until(
            lambda: (
                node.window.rates().get("file") and node.window.rates()["file"].events_per_second
            ),
            what="aggregates",
        )
        applies = engine.apply_calls
        controller.stop()  # controller gone: the engine keeps the last desired state
        time.sleep(0.5)  # several collect intervals without a controller
        assert engine.enabled() == ["file"]
        assert engine.apply_calls == applies
    finally:
        stop.set()
        t.join(timeout=10)
    assert not t.is_alive()
    assert result["stats"].acks >= 1


def test_capabilities_of_the_bpf_engine_shape():
    caps = {
        "kernel": "6.18.0",
        "event_sets": {
            "file": {
                "strategy": "sleepable",
                "reason": "best strategy available",
                "attempts": [
                    {"strategy": "sleepable", "ok": True},
                    {"strategy": "nofault", "ok": True},
                    {"strategy": "exit-retry", "ok": False},
                ],
            },
            "exec": {"strategy": None, "reason": "", "error": "no BTF"},
        },
    }
    file, exec_ = _strategies(caps)
    assert (file.event_set, file.strategy, list(file.available)) == (
        "file",
        "sleepable",
        ["sleepable", "nofault"],
    )
    assert (exec_.strategy, exec_.reason) == ("", "no BTF")


def test_outage_buffer_is_bounded_and_reports_the_shortfall_as_discarded():
    c = ControlClient(SyntheticEngine(), "127.0.0.1:1", "n", options=ClientOptions(buffer_budget=3))
    for i in range(5):
        agg = Aggregates(i, i + 1, {"file": SetAggregate(delivered=10, dropped=1)})
        c._enqueue(_batch_pb(agg, [], replayed=True))
    batches = c._outbox.batches()
    assert len(batches) == 3
    # nothing was ever sent: the oldest are discarded (seqs 1 and 2 are never sent)
    assert [b.interval_start_ns for b in batches] == [2, 3, 4]
    assert [b.seq for b in batches] == [3, 4, 5]
    assert {b.instance_id for b in batches} == {c.instance_id}
    assert sum(b.lost_intervals for b in batches) == 2
    kept = sum(s.delivered + s.dropped for b in batches for s in b.sets)
    discarded = sum(s.discarded for b in batches for s in b.sets)
    assert kept == 3 * 11 and discarded == 2 * 11  # every event kept or reported discarded
    assert (c.stats.batches_discarded, c.stats.events_discarded) == (2, 22)


def test_loadgen_engine_honours_filters_and_apply():
    """Test infrastructure, not the agent: the load generator's SyntheticEngine, which the
    e2e and bench simulated agents stand on, must honour apply() and filters like the real
    engine (tests/bpf/test_event_sets.py checks the real one in the kernel), or the fleet
    tests built on it would pass on events no filter would let through."""
    from tracefleet.agent.capture.engine import Filters

    e = SyntheticEngine(rate=1000, seed=3, fail_sets=["net"])
    st = {
        s.name: s
        for s in e.apply(
            {
                "file": EventSetConfig("file", True, Filters(pids=(42,)), sample_rate=1.0),
                "net": EventSetConfig("net", True),
                "bogus": EventSetConfig("bogus", True),
            }
        )
    }
    assert st["file"].attached and not st["net"].attached and st["net"].error
    assert st["bogus"].error == "unknown event set"
    agg = e.collect()
    assert list(agg.sets) == ["file"]
    s = agg.sets["file"]
    assert sum(s.events_by_syscall.values()) == s.delivered == s.latency.count
    assert sum(s.outcomes.values()) == s.delivered
    events = e.sample_events(5)
    assert events and all(ev["pid"] == 42 and ev["event_set"] == "file" for ev in events)


class RaisingEngine(SyntheticEngine):
    def apply(self, desired):
        raise RuntimeError("kernel said no")


def test_an_engine_that_raises_is_reported_not_fatal(controller):
    engine = RaisingEngine()
    stop, t, _ = start_agent(controller.address, "bad-1", {}, engine)
    try:
        node = wait_until(lambda: controller.controller.fleet.nodes.get("bad-1"), what="register")
        res = controller.call(controller.controller.configure, "file", True)
        wait_until(lambda: node.applied_generation == res.generation, what="ack")
        (st,) = node.info["statuses"]
        assert st["name"] == "file" and not st["attached"]
        assert st["error"] == "apply failed: kernel said no"
        assert node.conn is not None  # still connected
    finally:
        stop.set()
        t.join(timeout=10)


def test_status_by_selector_and_failed_sets_surface(controller):
    stop, t, _ = start_agent(
        controller.address, "db-9", {"role": "db"}, SyntheticEngine(fail_sets=["exec"])
    )
    try:
        node = wait_until(lambda: controller.controller.fleet.nodes.get("db-9"), what="register")
        res = controller.call(controller.controller.configure, "exec", True, "role=db")
        wait_until(lambda: node.applied_generation == res.generation, what="ack")
        import io
        import json

        from tracefleet.controller.operator import cli

        out, err = io.StringIO(), io.StringIO()
        code = cli.main(
            ["--controller", controller.address, "status", "-s", "role=db", "-o", "json"], out, err
        )
        assert code == 0
        (n,) = json.loads(out.getvalue())["nodes"]
        assert n["name"] == "db-9"
        assert {s["name"]: s["error"] for s in n["statuses"]}["exec"].startswith(
            "synthetic failure"
        )
        out = io.StringIO()
        code = cli.main(["--controller", controller.address, "enable", "exec", "-s", "role=db",
                         "--wait", "--wait-timeout", "5s"], out, err)  # fmt: skip
        assert code == cli.EXIT_NOT_CONVERGED  # applied, but the node reported an error
        assert "db-9: exec: synthetic failure" in err.getvalue()
    finally:
        stop.set()
        t.join(timeout=10)


class OlderController(agent_pb2_grpc.AgentServiceServicer):
    """A controller from before BatchAck: desired state, then it only reads."""

    def __init__(self) -> None:
        self.batches: list = []

    def Connect(self, request_iterator, context):
        next(request_iterator)  # Register
        yield agent_pb2.ControllerMessage(
            desired_state=agent_pb2.DesiredState(
                generation=1, event_sets=[types_pb2.EventSetSpec(name="file", enabled=True)]
            )
        )
        for msg in request_iterator:
            if msg.WhichOneof("kind") == "result_batch":
                self.batches.append(msg.result_batch)


def test_agent_keeps_delivering_to_a_controller_that_never_acknowledges():
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    svc = OlderController()
    server = grpc.server(ThreadPoolExecutor(4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    engine = SyntheticEngine(rate=1000, seed=5)
    stop, t, result = start_agent(f"127.0.0.1:{port}", "old-1", {}, engine)
    try:
        # more than the send window (32): the agent did not stall waiting for acks
        wait_until(lambda: len(svc.batches) >= 40, what="batches beyond the window")
    finally:
        stop.set()
        t.join(timeout=10)
        server.stop(0)
    seqs = [b.seq for b in svc.batches]
    assert seqs == list(range(1, len(seqs) + 1))  # in order, none twice, none missing
    assert result["stats"].batches_discarded == 0


class _LoadingEngine(SyntheticEngine):
    """apply() of an enabled set blocks as a first load does (the verifier: seconds), until
    collect() has run three times meanwhile or a deadline passes."""

    def __init__(self) -> None:
        super().__init__(rate=200, seed=1)
        self.collects_during_apply = 0
        self._in_apply = threading.Event()
        self._collected = threading.Event()

    def apply(self, desired):
        if any(c.enabled for c in desired.values()):
            self._in_apply.set()
            self._collected.wait(timeout=30)
            self._in_apply.clear()
        return super().apply(desired)

    def collect(self):
        if self._in_apply.is_set():
            self.collects_during_apply += 1
            if self.collects_during_apply >= 3:
                self._collected.set()
        return super().collect()


def test_agent_keeps_reporting_while_an_apply_loads_a_set(controller):
    """A node whose apply() is loading an event set still sends its aggregates, so the
    controller does not call it stale (and `enable --wait` does not skip it)."""
    engine = _LoadingEngine()
    stop, t, _ = start_agent(controller.address, "db-1", {"role": "db"}, engine)
    try:
        node = wait_until(lambda: controller.controller.fleet.nodes.get("db-1"), what="register")
        res = controller.call(controller.controller.configure, "file", True, "role=db")
        wait_until(lambda: node.applied_generation == res.generation, timeout=60, what="ack")
        assert engine.collects_during_apply >= 3
        assert engine.enabled() == ["file"]
    finally:
        stop.set()
        t.join(timeout=10)
    assert not t.is_alive()


class SilentController(agent_pb2_grpc.AgentServiceServicer):
    """Accepts the stream and the Register, then never answers (a hung replica)."""

    def __init__(self) -> None:
        self.registers = 0

    def Connect(self, request_iterator, context):
        next(request_iterator)
        self.registers += 1
        for _ in request_iterator:  # until the agent gives up on this stream
            pass
        return
        yield  # a generator: a stream that never sends


def test_agent_moves_on_from_a_replica_that_never_answers_the_registration(controller):
    """Given [silent, working]: the agent stays on neither a refused nor a hung replica; it
    gives the silent one answer_timeout, then registers with the next address."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    svc = SilentController()
    # accept the agent's keepalive pings (20 s) as the controller does: else this server's
    # GOAWAY for too many pings would break the stream after a minute or so anyway
    server = grpc.server(
        ThreadPoolExecutor(4),
        options=[
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    agent_pb2_grpc.add_AgentServiceServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    engine = SyntheticEngine(rate=100, seed=7)
    options = dataclasses.replace(FAST, answer_timeout=0.5)
    # a node whose first address (a hash of its name) is the silent replica
    name = next(f"fo-{i}" for i in range(100) if first_controller(f"fo-{i}", 2) == 0)
    addresses = [f"127.0.0.1:{port}", controller.address]
    stop, t, result = start_agent(addresses, name, {}, engine, options)
    try:
        wait_until(lambda: svc.registers >= 1, what="the agent dialed the silent replica first")
        node = wait_until(
            lambda: controller.controller.fleet.nodes.get(name),
            timeout=scaled(30),
            what="the agent registered with the next replica",
        )
        res = controller.call(controller.controller.configure, "file", True, "")
        wait_until(lambda: node.applied_generation == res.generation, what="ack")
        assert engine.enabled() == ["file"]
    finally:
        stop.set()
        t.join(timeout=10)
        server.stop(0)
    assert result["stats"].failovers >= 1 and result["stats"].connects >= 1


def test_an_answered_agent_stays_on_its_replica_after_the_answer_timeout(controller):
    """Given [working, another]: once the working replica answered the registration, the
    session lasts; the answer watch ending must not end it (it did: every agent given
    several replicas moved to the next one answer_timeout after each connect, a fleet-wide
    reconnect every 20 s that the replicated bench saw as 3-6 s rounds)."""
    import dataclasses
    import time

    engine = SyntheticEngine(rate=100, seed=7)
    options = dataclasses.replace(FAST, answer_timeout=0.3)
    name = next(f"stay-{i}" for i in range(100) if first_controller(f"stay-{i}", 2) == 0)
    addresses = [controller.address, "127.0.0.1:9"]  # the second is never dialed
    stop, t, result = start_agent(addresses, name, {}, engine, options)
    try:
        node = wait_until(lambda: controller.controller.fleet.nodes.get(name),
                          what="the agent registered with its first replica")  # fmt: skip
        first_conn = node.conn
        time.sleep(5 * options.answer_timeout)  # several answer timeouts, well answered
        assert node.conn is first_conn, "the agent's stream was replaced: it reconnected"
        res = controller.call(controller.controller.configure, "file", True, "")
        wait_until(lambda: node.applied_generation == res.generation, what="ack")
    finally:
        stop.set()
        t.join(timeout=10)
    assert result["stats"].failovers == 0 and result["stats"].connects == 1, result["stats"]


def test_agents_given_several_replicas_spread_over_them_from_their_node_name():
    """The first address is derived from the node name: a fleet given [a, b, c] does not all
    dial a; the same name always picks the same replica (a restarted agent returns to it)."""
    import hashlib

    addresses = ["a:7070", "b:7070", "c:7070"]
    engine = SyntheticEngine(rate=0, seed=1)
    first = {}
    for i in range(300):
        name = f"node-{i:04d}"
        first[name] = ControlClient(engine, addresses, name).controller
    share = {a: sum(1 for v in first.values() if v == a) for a in addresses}
    assert all(n >= 60 for n in share.values()), share  # 100 each expected
    again = ControlClient(engine, addresses, "node-0007").controller
    assert again == first["node-0007"]
    # documented derivation: sha256 of the name, its first 8 bytes big-endian, mod count
    digest = hashlib.sha256(b"node-0007").digest()
    assert again == addresses[int.from_bytes(digest[:8], "big") % 3]
    assert ControlClient(engine, ["only:7070"], "node-0007").controller == "only:7070"


def test_deadline_loop_sleeps_without_a_timer_until_a_ttl_arrives_then_enforces_it():
    """No TTL: the deadline loop waits for a desired state (no timer every second per
    agent); a desired state with a TTL wakes it and the set is switched off at its deadline."""
    import asyncio

    class Call:
        def __init__(self):
            self.sent = []

        async def write(self, msg):
            self.sent.append(msg)

    async def main():
        engine = SyntheticEngine(event_sets=("file",))
        c = ControlClient(engine, "127.0.0.1:1", "n", options=ClientOptions(
            offload_engine_calls=False, agent_version="test"))  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(c._deadline_loop(stop))
        for _ in range(3):
            await asyncio.sleep(0)
        timers = [h for h in loop._scheduled if not h.cancelled()]
        assert not timers, timers
        deadline_ns = int((time.time() + 0.2) * 1e9)
        spec = types_pb2.EventSetSpec(name="file", enabled=True, expires_at_unix_ns=deadline_ns)
        call = Call()
        await c._on_desired(call, agent_pb2.DesiredState(generation=1, event_sets=[spec]))
        assert engine.enabled() == ["file"] and call.sent[0].ack.generation == 1
        t0 = time.monotonic()
        while engine.enabled() and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.05)
        assert engine.enabled() == [], "the TTL was not enforced by the agent"
        stop.set()
        task.cancel()

    asyncio.run(main())
