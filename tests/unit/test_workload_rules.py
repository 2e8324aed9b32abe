"""Workload selectors in the control plane: a rule keeps the selector (not cgroup ids) in
the store, on the wire to the agents, and back into the agent's engine filters."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tracefleet.agent.engine import Filters
from tracefleet.agent.workload import WorkloadSelector
from tracefleet.controller._internal.controller import filters_problem
from tracefleet.controller._internal.rules import FilterSpec, Rule
from tracefleet.controller._internal.store import Store
from tracefleet.v1 import types_pb2

SPEC = FilterSpec(pids=(42,), namespace="prod", pod="db-*", container="postgres",
                  pod_labels="app=db,tier!=cache", follow=True)  # fmt: skip


def test_selector_survives_store_reopen(tmp_path):
    path = str(tmp_path / "c.db")
    s = Store(path)
    s.put_rules([Rule("file", True, "role=db", SPEC)])
    s.close()
    s = Store(path)
    (rule,) = s.rules()
    assert rule.filters == SPEC
    s.close()
    # what the store holds is the selector itself
    (row,) = sqlite3.connect(path).execute("SELECT filters FROM rules").fetchall()
    stored = json.loads(row[0])
    assert (stored["namespace"], stored["pod"], stored["follow"]) == ("prod", "db-*", True)


def test_rule_stored_before_selectors_reads_back_unchanged():
    old = {"pids": [1], "comms": [], "cgroup_ids": [7], "path_prefixes": []}
    spec = FilterSpec.from_dict(old)
    assert spec == FilterSpec(pids=(1,), cgroup_ids=(7,))
    assert spec.to_dict() == old  # no new keys for a rule without a selector


def test_selector_on_the_wire_to_the_agent():
    pb = types_pb2.Filters(**SPEC.to_pb_fields())
    wire = types_pb2.Filters.FromString(pb.SerializeToString())
    assert FilterSpec.from_pb(wire) == SPEC
    # the agent's side (controlclient): the same selector, to be resolved on its node
    w = wire.workload
    got = Filters(pids=tuple(wire.pids), follow=wire.follow,
                  workload=WorkloadSelector(w.namespace, w.pod, w.container, w.labels))  # fmt: skip
    assert got.workload == WorkloadSelector("prod", "db-*", "postgres", "app=db,tier!=cache")
    assert got.follow


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        (FilterSpec(follow=True), "--follow follows the processes of --pid"),
        (FilterSpec(pod_labels="app=db,=x"), "pod selector term '=x'"),
        (FilterSpec(namespace="a\nb"), "namespace"),
    ],
)
def test_bad_selectors_are_refused_naming_the_fix(spec, why):
    assert why in filters_problem(spec)


def test_cgroup_ids_have_no_small_slot_count():
    assert filters_problem(FilterSpec(cgroup_ids=tuple(range(1, 101)))) == ""
