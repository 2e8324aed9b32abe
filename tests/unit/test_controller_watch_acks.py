"""WatchAcks over gRPC (in-process controller): the first message gives every watched node's
state, later ones are pushed as nodes ack; requests it cannot serve fail naming why."""

import os

import grpc
import pytest

from tests.unit.controller_helpers import InProcessController
from tests.unit.test_controller_core import register
from tracefleet.v1 import agent_pb2, control_pb2, control_pb2_grpc

SCALE = 10 if os.environ.get("TRACEFLEET_IN_VM") == "1" else 1


@pytest.fixture
def ctl():
    c = InProcessController()
    yield c
    c.stop()


def _stub(c):
    channel = grpc.insecure_channel(c.address)
    return channel, control_pb2_grpc.ControlServiceStub(channel)


def test_states_then_pushed_acks(ctl):
    nodes = {}
    for name in ("a", "b"):
        nodes[name] = ctl.call(register, ctl.controller, name, {"role": "db"})[0]
    gen = ctl.call(ctl.controller.configure, "file", True, "role=db").generation
    channel, stub = _stub(ctl)
    try:
        req = control_pb2.WatchAcksRequest(generation=gen, nodes=["a", "b", "ghost"])
        stream = stub.WatchAcks(req, timeout=30 * SCALE)
        first = next(stream)
        states = {n.name: n.state for n in first.nodes}
        assert states == {
            "a": control_pb2.ACK_STATE_PENDING,
            "b": control_pb2.ACK_STATE_PENDING,
            "ghost": control_pb2.ACK_STATE_UNKNOWN,
        }
        assert (first.pending_count, first.applied_count, first.unknown_count) == (2, 0, 1)
        ctl.call(ctl.controller.on_ack, nodes["a"], agent_pb2.Ack(generation=gen))
        msg = next(stream)
        assert [(n.name, n.state, n.applied_generation) for n in msg.nodes] == [
            ("a", control_pb2.ACK_STATE_APPLIED, gen)
        ]
        assert (msg.pending_count, msg.applied_count) == (1, 1)
        ctl.call(ctl.controller.on_disconnect, nodes["b"], nodes["b"].conn)
        msg = next(stream)
        assert [(n.name, n.state) for n in msg.nodes] == [
            ("b", control_pb2.ACK_STATE_NOT_CONNECTED)
        ]
        assert (msg.pending_count, msg.not_connected_count) == (0, 1)
        stream.cancel()
    finally:
        channel.close()


def test_a_generation_not_issued_yet_is_refused(ctl):
    channel, stub = _stub(ctl)
    try:
        req = control_pb2.WatchAcksRequest(generation=7)
        with pytest.raises(grpc.RpcError) as e:
            next(stub.WatchAcks(req, timeout=30 * SCALE))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "generation 7 was not issued yet (current: 0); use 0" in e.value.details()
    finally:
        channel.close()


def test_more_names_than_the_node_limit_are_refused(ctl):
    channel, stub = _stub(ctl)
    try:
        too_many = [f"n{i}" for i in range(ctl.controller.max_nodes + 1)]
        with pytest.raises(grpc.RpcError) as e:
            next(stub.WatchAcks(control_pb2.WatchAcksRequest(nodes=too_many), timeout=30 * SCALE))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "(--max-nodes)" in e.value.details()
    finally:
        channel.close()
