"""Fuzz the controller's gRPC services with generated messages: every call gets a proper
status (never UNKNOWN or INTERNAL), the controller never dies, and a well-behaved client
keeps getting answers throughout."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import scaled, wait_until
from tests.e2e.fleet_helpers import ControllerProc
from tracefleet.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2

pytestmark = pytest.mark.e2e

BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "file",
            "exec",
            "net",
            "vfs",
            "all",
            "role=db",
            "node=a|b",
            "k!=v",
            "=",
            ",,",
            "role=db,",
            "a=b=c",
            "\x00",
            "x" * 5000,
        ]
    ),
)
filters = st.builds(
    types_pb2.Filters,
    pids=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20),
    comms=st.lists(texts, max_size=6),
    cgroup_ids=st.lists(st.integers(0, 2**64 - 1), max_size=6),
    path_prefixes=st.lists(texts, max_size=3),
)
# half of the requests name a real set and a sane selector, so the accepted paths
# (rules, generations, TTLs, filters) are exercised too, not only the refusals
configure = st.builds(
    control_pb2.ConfigureEventSetRequest,
    event_set=st.one_of(st.sampled_from(["file", "exec", "net"]), texts),
    enabled=st.booleans(),
    selector=st.one_of(st.sampled_from(["", "all", "role=db", "node=n1|n2"]), texts),
    filters=filters,
    canary_percent=st.integers(0, 2**32 - 1),
    sample_rate=st.floats(allow_nan=True, allow_infinity=True),
)
valid_configure = st.builds(
    control_pb2.ConfigureEventSetRequest,
    event_set=st.sampled_from(["file", "exec", "net"]),
    enabled=st.booleans(),
    selector=st.sampled_from(["", "all", "role=db", "node=n1|n2", "zone!=a"]),
    filters=st.builds(
        types_pb2.Filters,
        pids=st.lists(st.integers(1, 2**22), max_size=4),
        comms=st.lists(st.text("abcxyz-", min_size=1, max_size=15), max_size=2),
    ),
    canary_percent=st.integers(0, 100),
    sample_rate=st.floats(0, 1),
)
ttl_seconds = st.integers(-(2**40), 2**40)
agent_messages = st.one_of(
    st.builds(
        lambda n, labels, gen, sets: agent_pb2.AgentMessage(
            register=agent_pb2.Register(
                node_name=n, labels=labels, applied_generation=gen, event_sets=sets
            )
        ),
        texts,
        st.dictionaries(texts, texts, max_size=5),
        st.integers(0, 2**64 - 1),
        st.lists(texts, max_size=5),
    ),
    st.builds(
        lambda g: agent_pb2.AgentMessage(ack=agent_pb2.Ack(generation=g)),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(
        lambda a, b, lost, inst, seq, sets: agent_pb2.AgentMessage(
            result_batch=agent_pb2.ResultBatch(
                interval_start_ns=a,
                interval_end_ns=b,
                lost_intervals=lost,
                instance_id=inst,
                seq=seq,
                sets=sets,
            )
        ),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(0, 2**32 - 1),
        st.one_of(st.just(""), st.sampled_from(["i1", "i2"]), texts),
        st.one_of(st.integers(0, 5), st.integers(0, 2**64 - 1)),
        st.lists(
            st.builds(
                types_pb2.SetAggregate,
                event_set=st.one_of(st.sampled_from(["file", "net"]), texts),
                delivered=st.integers(0, 2**64 - 1),
                dropped=st.integers(0, 2**64 - 1),
                discarded=st.integers(0, 2**64 - 1),
            ),
            max_size=3,
        ),
    ),
)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory):
    ctl = ControllerProc(Path(tmp_path_factory.mktemp("fuzz"))).start()
    yield ctl
    assert ctl.proc is not None and ctl.proc.poll() is None, "controller died under fuzzing"
    ctl.stop()


@pytest.fixture(scope="module")
def channel(controller: ControllerProc):
    ch = grpc.insecure_channel(controller.address)
    yield ch
    ch.close()


class Bystander:
    """A well-behaved client calling GetStatus in a loop while the fuzzer runs."""

    def __init__(self, address: str):
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.ch = grpc.insecure_channel(address)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        stub = control_pb2_grpc.ControlServiceStub(self.ch)
        while not self.stop.is_set():
            try:
                stub.GetStatus(control_pb2.GetStatusRequest(), timeout=10)
                self.ok += 1
            except grpc.RpcError as e:
                self.errors.append(str(e.code()))
            self.stop.wait(0.05)


@pytest.fixture(scope="module")
def bystander(controller: ControllerProc):
    b = Bystander(controller.address)
    b.thread.start()
    yield b
    b.stop.set()
    b.thread.join(timeout=15)
    b.ch.close()
    assert b.ok > 0 and not b.errors, f"bystander: {b.ok} ok, errors {b.errors[:5]}"


def call_status(fn, *args, **kw) -> grpc.StatusCode:
    try:
        fn(*args, timeout=10, **kw)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=st.one_of(configure, valid_configure), ttl=ttl_seconds, with_ttl=st.booleans())
def test_configure_event_set_answers_properly(channel, bystander, req, ttl, with_ttl):
    if with_ttl:
        req.ttl.seconds = max(-315576000000, min(315576000000, ttl))
    code = call_status(control_pb2_grpc.ControlServiceStub(channel).ConfigureEventSet, req)
    assert code not in BAD, (code, req)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(sel=texts, top_set=texts)
def test_status_and_top_answer_properly(channel, bystander, sel, top_set):
    stub = control_pb2_grpc.ControlServiceStub(channel)
    assert call_status(stub.GetStatus, control_pb2.GetStatusRequest(selector=sel)) not in BAD
    code = call_status(stub.GetTop, control_pb2.GetTopRequest())
    assert code not in BAD


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(agent_messages, min_size=1, max_size=6))
def test_agent_stream_survives_generated_messages(channel, bystander, msgs):
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    try:
        for _ in stub.Connect(iter(msgs), timeout=3):
            pass
    except grpc.RpcError as e:
        assert e.code() not in {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}, (e, msgs)


def test_reconnect_flood(controller, bystander):
    """200 streams opened and dropped at once by one node name."""
    chans = [grpc.insecure_channel(controller.address) for _ in range(20)]
    try:
        reg = agent_pb2.AgentMessage(
            register=agent_pb2.Register(node_name="flood", event_sets=["file"])
        )
        calls = []
        for i in range(200):
            stub = agent_pb2_grpc.AgentServiceStub(chans[i % len(chans)])
            calls.append(stub.Connect(iter([reg]), timeout=5))
        for c in calls:
            try:
                for _ in c:
                    pass
            except grpc.RpcError as e:
                assert e.code() not in {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
    finally:
        for ch in chans:
            ch.close()
    # the controller still answers, knows the node once (not once per stream), and saw
    # every one of its streams end
    stub = control_pb2_grpc.ControlServiceStub(grpc.insecure_channel(controller.address))

    def flood_nodes() -> list:
        reply = stub.GetStatus(control_pb2.GetStatusRequest(), timeout=10)
        return [n for n in reply.nodes if n.name == "flood"]

    assert len(flood_nodes()) == 1, flood_nodes()
    wait_until(lambda: flood_nodes()[0].state != control_pb2.NODE_STATE_CONNECTED,
               timeout=scaled(30), what="the flood node's streams to be seen closed")  # fmt: skip
