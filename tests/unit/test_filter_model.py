"""One filter type (tracefleet.model.filters.Filters) and its two edges: the API
(tracefleet.v1.Filters, both ways) and the kernel (struct tf_filter). Every field is set and
must come through: a conversion that drops one fails here."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tracefleet.agent.kernel.abi import TfFilter
from tracefleet.agent.kernel.kfilter import to_kernel
from tracefleet.model.filters import (
    MAX_COMM_BYTES,
    MAX_PREFIX_BYTES,
    PID_MAX_LIMIT,
    FilterError,
    Filters,
    WorkloadSelector,
)
from tracefleet.model.wire import filters_from_pb, filters_to_pb
from tracefleet.v1 import types_pb2

FULL = Filters(
    pids=(42, PID_MAX_LIMIT),
    comms=("postgres", "x" * MAX_COMM_BYTES),
    cgroup_ids=(7, 2**64 - 1),
    path_prefixes=("/var/lib/" + "p" * (MAX_PREFIX_BYTES - 9),),
    workload=WorkloadSelector(namespace="prod", pod="db-*", container="pg",
                              labels="app=db,tier!=cache"),
    follow=True,
)  # fmt: skip


def _unset(obj: object) -> list[str]:
    """Fields of a dataclass (nested ones too) still at their default."""
    out = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += [f"{f.name}.{n}" for n in _unset(v)]
        elif v == f.default:
            out.append(f.name)
    return out


def test_the_sample_sets_every_field_of_the_model():
    # a field added to the model must be added here, or this test proves nothing about it
    assert _unset(FULL) == []
    assert FULL.problem() == ""


def _pb_full() -> types_pb2.Filters:
    pb = types_pb2.Filters(
        pids=[42, PID_MAX_LIMIT], comms=["postgres", "x" * MAX_COMM_BYTES],
        cgroup_ids=[7, 2**64 - 1], path_prefixes=list(FULL.path_prefixes),
        workload=types_pb2.WorkloadSelector(namespace="prod", pod="db-*", container="pg",
                                            labels="app=db,tier!=cache"),
        follow=True,
    )  # fmt: skip
    # every field of the API's messages is set (a field added to the proto must be here)
    for msg in (pb, pb.workload):
        present = {f.name for f, _ in msg.ListFields()}
        assert present == set(msg.DESCRIPTOR.fields_by_name), msg.DESCRIPTOR.name
    return pb


def test_proto_to_model_to_proto_keeps_every_field():
    pb = _pb_full()
    wire = types_pb2.Filters.FromString(pb.SerializeToString())
    model = filters_from_pb(wire)
    assert model == FULL
    assert filters_to_pb(model) == pb
    assert filters_to_pb(FULL).SerializeToString(deterministic=True) == pb.SerializeToString(
        deterministic=True
    )


def test_stored_form_keeps_every_field():
    assert Filters.from_json(json.loads(json.dumps(FULL.to_json()))) == FULL
    assert Filters.from_json(Filters().to_json()) == Filters()


def test_model_to_kernel_values():
    k = to_kernel(FULL)
    assert (k.npids, list(k.pids[: k.npids])) == (2, [42, PID_MAX_LIMIT])
    assert (k.ncomms, [k.comms[i].value for i in range(k.ncomms)]) == (
        2, [b"postgres", b"x" * MAX_COMM_BYTES]
    )  # fmt: skip
    assert (k.prefix_len, k.prefix) == (MAX_PREFIX_BYTES, FULL.path_prefixes[0].encode())
    assert k.cgroup_filter == 1  # the ids themselves go to the tf_cgroups map
    assert k.follow == 1
    # every field of the kernel's struct is written (a field added to events.h must be here)
    written = {n for n, _ in TfFilter._fields_ if not n.startswith("_")}
    assert {n for n in written if getattr(k, n) in (0, b"")} == set()


@pytest.mark.parametrize(
    ("filters", "cgroup_filter"),
    [
        (Filters(), 0),
        (Filters(cgroup_ids=(5,)), 1),
        # a selector matching no pod yet still filters: nothing passes until one appears
        (Filters(workload=WorkloadSelector(namespace="prod")), 1),
    ],
)
def test_cgroup_filter_is_on_for_ids_and_for_a_selector(filters, cgroup_filter):
    assert to_kernel(filters).cgroup_filter == cgroup_filter


@pytest.mark.parametrize(
    ("filters", "why"),
    [
        (Filters(pids=tuple(range(1, 10))), "at most 8 pids"),
        (Filters(pids=(0,)), "pids must be 1..4194304, got 0"),
        (Filters(pids=(-5,)), "pids must be 1..4194304, got -5"),
        (Filters(cgroup_ids=(0,)), "cgroup ids must be 1..2^64-1, got 0"),
        (Filters(comms=("x" * 16,)), "comm 'xxxxxxxxxxxxxxxx': 1..15 printable bytes"),
        (Filters(comms=("a\nb",)), "printable"),
        (Filters(path_prefixes=("etc",)), "path prefix 'etc': an absolute path"),
        (Filters(path_prefixes=("/" * 65,)), "up to 64 bytes"),
        (Filters(path_prefixes=("/a", "/b")), "at most 1 path prefixes"),
        (Filters(follow=True), "--follow follows the processes of --pid: add --pid P"),
        (Filters(workload=WorkloadSelector(pod="x" * 254)), "pod 'xxx"),
        (Filters(workload=WorkloadSelector(labels="=x")), "pod selector term '=x': use key=value"),
    ],
)
def test_one_check_names_the_field_and_the_fix_on_both_sides(filters, why):
    assert why in filters.problem()
    # the agent's kernel edge refuses the same filter with the same words (never truncates)
    with pytest.raises(FilterError) as e:
        to_kernel(filters)
    assert why in str(e.value)


def test_malformed_stored_workload_is_a_filter_error():
    with pytest.raises(FilterError, match="workload"):
        Filters.from_json({"workload": "prod"})
