"""What a change costs the agent's controller client: the clients of one process (the load
generator's simulated agents) that receive the same DesiredState decode it and build its Ack
once, each still applying and acking its own state; a desired state without a TTL does not
wake the deadline loop."""

import asyncio

from tests.loadgen import SyntheticEngine
from tracefleet.agent.capture.engine import EventSetConfig
from tracefleet.agent.control import client as client_mod
from tracefleet.agent.control.client import ClientOptions, ControlClient
from tracefleet.model import wire
from tracefleet.v1 import agent_pb2, types_pb2

OPTS = ClientOptions(offload_engine_calls=False, agent_version="test")


class Call:
    def __init__(self) -> None:
        self.sent: list[agent_pb2.AgentMessage] = []

    async def write(self, msg: agent_pb2.AgentMessage) -> None:
        self.sent.append(msg)


def _message(generation: int, *specs: types_pb2.EventSetSpec) -> bytes:
    return agent_pb2.DesiredState(generation=generation, event_sets=specs).SerializeToString()


async def _deliver(clients: list[ControlClient], calls: list[Call], data: bytes) -> None:
    # each stream parses its own copy of the bytes, as gRPC does
    for c, call in zip(clients, calls, strict=True):
        await c._on_desired(call, agent_pb2.DesiredState.FromString(data))


def test_clients_of_one_process_decode_a_change_and_build_its_ack_once(monkeypatch):
    decoded = {"filters": 0, "statuses": 0}
    filters_from_pb, status_pb = wire.filters_from_pb, client_mod._status_pb

    def counting_filters(pb):
        decoded["filters"] += 1
        return filters_from_pb(pb)

    def counting_status(s):
        decoded["statuses"] += 1
        return status_pb(s)

    monkeypatch.setattr(wire, "filters_from_pb", counting_filters)
    monkeypatch.setattr(client_mod, "_status_pb", counting_status)
    per_fleet = {}

    async def main(n: int) -> None:
        engines = [SyntheticEngine(event_sets=("file", "exec")) for _ in range(n - 1)]
        engines.append(SyntheticEngine(event_sets=("file", "exec"), fail_sets=("file",)))
        clients = [ControlClient(e, "127.0.0.1:1", f"n{i}", options=OPTS)
                   for i, e in enumerate(engines)]  # fmt: skip
        calls = [Call() for _ in clients]
        decoded.update(filters=0, statuses=0)
        on = types_pb2.EventSetSpec(name="file", enabled=True,
                                    filters=types_pb2.Filters(comms=["nginx"]))  # fmt: skip
        off = types_pb2.EventSetSpec(name="exec", enabled=False)
        await _deliver(clients, calls, _message(7 + n, on, off))
        per_fleet[n] = dict(decoded)
        # every client applied and acked its own state
        assert [e.enabled() for e in engines] == [["file"]] * (n - 1) + [[]]
        for call, engine in zip(calls, engines, strict=True):
            (ack,) = [m.ack for m in call.sent]
            assert ack.generation == 7 + n
            file_status = {s.name: s for s in ack.statuses}["file"]
            assert file_status.attached == (engine is not engines[-1])
        assert clients[0].desired is not None and clients[0].desired["file"].filters.comms == (
            "nginx",
        )

    for n in (10, 100):
        asyncio.run(main(n))
    # once per distinct message and status list, not once per client
    assert per_fleet[100] == per_fleet[10], per_fleet
    assert per_fleet[100]["filters"] <= 2, per_fleet


def test_a_shared_desired_state_is_each_clients_own_to_change():
    """A TTL that runs out on one agent switches the set off there only."""

    async def main() -> None:
        engines = [SyntheticEngine(event_sets=("file",)) for _ in range(2)]
        clients = [ControlClient(e, "127.0.0.1:1", f"n{i}", options=OPTS)
                   for i, e in enumerate(engines)]  # fmt: skip
        calls = [Call(), Call()]
        spec = types_pb2.EventSetSpec(name="file", enabled=True)
        await _deliver(clients, calls, _message(3, spec))
        first = clients[0].desired
        assert first is not None
        first["file"] = first["file"].__class__("file", False)  # what _deadline_loop does
        await clients[0]._reconcile()
        assert engines[0].enabled() == [] and engines[1].enabled() == ["file"]
        await _deliver(clients[1:], calls[1:], _message(3, spec))  # the same message again
        assert clients[1].desired is not None and clients[1].desired["file"].enabled
        assert engines[1].enabled() == ["file"]

    asyncio.run(main())


def test_a_desired_state_without_a_ttl_leaves_the_deadline_loop_asleep():
    async def main() -> None:
        engine = SyntheticEngine(event_sets=("file",))
        c = ControlClient(engine, "127.0.0.1:1", "n", options=OPTS)
        stop = asyncio.Event()
        task = asyncio.create_task(c._deadline_loop(stop))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not c._deadlines_set.is_set()  # waiting on it
        call = Call()
        await c._on_desired(call, agent_pb2.DesiredState.FromString(
            _message(1, types_pb2.EventSetSpec(name="file", enabled=True))))  # fmt: skip
        assert engine.enabled() == ["file"] and call.sent[0].ack.generation == 1
        assert not c._deadlines_set.is_set(), "woken for a state without deadlines"
        task.cancel()

    asyncio.run(main())


def test_load_generator_engines_sharing_configs_keep_their_own_results():
    """SyntheticEngine.apply() results are shared by config identity: engines with other
    failing sets, or other configs, still get their own."""
    on = {"file": EventSetConfig("file", True)}
    same = SyntheticEngine(event_sets=("file",))
    failing = SyntheticEngine(event_sets=("file",), fail_sets=("file",))
    assert [s.attached for s in SyntheticEngine(event_sets=("file",)).apply(on)] == [True]
    assert [s.attached for s in same.apply(on)] == [True] and same.enabled() == ["file"]
    assert [s.attached for s in failing.apply(on)] == [False] and failing.enabled() == []
    off = {"file": EventSetConfig("file", False)}
    assert [s.enabled for s in same.apply(off)] == [False] and same.enabled() == []
    assert same.apply_calls == 2
