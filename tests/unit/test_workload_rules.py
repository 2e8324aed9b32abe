"""Workload selectors in the control plane: a rule keeps the selector (not cgroup ids) in
the store, on the wire to the agents, and back into the agent's engine filters."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tracefleet.controller.domain.rules import Rule
from tracefleet.controller.storage.store import Store
from tracefleet.model.filters import Filters, WorkloadSelector
from tracefleet.model.wire import filters_from_pb, filters_to_pb
from tracefleet.v1 import types_pb2

SPEC = Filters(pids=(42,), follow=True,
               workload=WorkloadSelector(namespace="prod", pod="db-*", container="postgres",
                                         labels="app=db,tier!=cache"))  # fmt: skip


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
    spec = Filters.from_json(old)
    assert spec == Filters(pids=(1,), cgroup_ids=(7,))
    assert spec.to_json() == old  # no new keys for a rule without a selector


def test_selector_on_the_wire_to_the_agent():
    wire = types_pb2.Filters.FromString(filters_to_pb(SPEC).SerializeToString())
    # the agent reads it with the same conversion (control/client.py): the selector itself, to be
    # resolved on its node
    got = filters_from_pb(wire)
    assert got == SPEC
    assert got.workload == WorkloadSelector("prod", "db-*", "postgres", "app=db,tier!=cache")
    assert got.follow


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        (Filters(follow=True), "--follow follows the processes of --pid"),
        (
            Filters(workload=WorkloadSelector(labels="app=db,=x")),
            "pod selector term '=x'",
        ),
        (Filters(workload=WorkloadSelector(namespace="a\nb")), "namespace"),
    ],
)
def test_bad_selectors_are_refused_naming_the_fix(spec, why):
    assert why in spec.problem()


def test_cgroup_ids_have_no_small_slot_count():
    assert Filters(cgroup_ids=tuple(range(1, 101))).problem() == ""
