"""The fail-static state file keeps every filter of a rule, typed, across an agent restart
(a rule with a workload selector or --follow must come back as the same rule)."""

import dataclasses
import json

from tracefleet.agent.controlclient import _filters_from_state
from tracefleet.agent.engine import Filters
from tracefleet.agent.workload import WorkloadSelector


def test_filters_round_trip_through_the_state_file_json():
    cases = [
        Filters(),
        Filters(pids=(7, 9), comms=("make",), cgroup_ids=(123,), path_prefixes=("/etc",)),
        Filters(
            workload=WorkloadSelector(namespace="prod", pod="db-*", labels="app=db"),
            pids=(42,),
            follow=True,
        ),
    ]
    for f in cases:
        saved = json.loads(json.dumps(dataclasses.asdict(f)))
        assert _filters_from_state(saved) == f


def test_state_of_an_older_agent_without_workload_fields_loads():
    assert _filters_from_state({"pids": [1], "comms": [], "cgroup_ids": [],
                                "path_prefixes": []}) == Filters(pids=(1,))  # fmt: skip
