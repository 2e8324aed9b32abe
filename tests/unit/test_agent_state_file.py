"""The fail-static state file keeps every filter of a rule, typed, across an agent restart
(a rule with a workload selector or --follow must come back as the same rule), including a
file written by the previous agent version."""

import asyncio
import json
import time

from tests.loadgen import SyntheticEngine
from tracefleet.agent.capture.engine import EventSetConfig
from tracefleet.agent.control.client import ClientOptions, ControlClient
from tracefleet.model.filters import Filters, WorkloadSelector

NODE, CONTROLLER = "db-1", "unix:/run/tracefleet/controller.sock"


def _restored(path: str) -> dict[str, EventSetConfig]:
    engine = SyntheticEngine(seed=1)
    client = ControlClient(engine, CONTROLLER, NODE, options=ClientOptions(state_file=path))
    asyncio.run(client._restore_state())
    assert client.desired is not None, "the saved state was not re-applied"
    return client.desired


def test_a_state_file_of_the_previous_version_restores_every_filter(tmp_path):
    # as the previous agent wrote it (dataclasses.asdict of its EventSetConfig: the workload
    # selector nested under "workload"), byte for byte the shape of its _save_state
    old = {
        "version": 1, "node": NODE, "controller": CONTROLLER, "generation": 7,
        "saved_at": time.time(), "redact_patterns": [],
        "event_sets": [
            {"name": "file", "enabled": True,
             "filters": {"pids": [42], "comms": ["postgres"], "cgroup_ids": [9001],
                         "path_prefixes": ["/var/lib/postgresql"],
                         "workload": {"namespace": "prod", "pod": "db-*",
                                      "container": "pg", "labels": "app=db,tier!=cache"},
                         "follow": True},
             "sample_rate": 0.5, "export": ["audit"], "expires_at": 0.0},
            {"name": "exec", "enabled": False,
             "filters": {"pids": [], "comms": [], "cgroup_ids": [], "path_prefixes": [],
                         "workload": {"namespace": "", "pod": "", "container": "",
                                      "labels": ""}, "follow": False},
             "sample_rate": 0.0, "export": [], "expires_at": 0.0},
        ],
    }  # fmt: skip
    path = tmp_path / "state.json"
    path.write_text(json.dumps(old))
    got = _restored(str(path))
    assert got["file"] == EventSetConfig(
        "file", True,
        Filters(pids=(42,), comms=("postgres",), cgroup_ids=(9001,),
                path_prefixes=("/var/lib/postgresql",),
                workload=WorkloadSelector("prod", "db-*", "pg", "app=db,tier!=cache"),
                follow=True),
        sample_rate=0.5, export=("audit",),
    )  # fmt: skip
    assert got["exec"] == EventSetConfig("exec", False, Filters())


def test_saved_state_restores_the_same_filters(tmp_path):
    path = str(tmp_path / "state.json")
    desired = {
        "file": EventSetConfig("file", True, Filters(
            pids=(7, 9), comms=("make",), cgroup_ids=(123,), path_prefixes=("/etc",),
            workload=WorkloadSelector(namespace="prod", pod="db-*", labels="app=db"),
            follow=True)),
        "net": EventSetConfig("net", True, Filters(workload=WorkloadSelector(container="c"))),
        "exec": EventSetConfig("exec", False),
    }  # fmt: skip
    writer = ControlClient(SyntheticEngine(seed=1), CONTROLLER, NODE,
                           options=ClientOptions(state_file=path))  # fmt: skip
    writer.desired = dict(desired)
    writer._save_state(3)
    assert _restored(path) == desired
    # what the previous agent reads from it (an agent downgraded after a save: its reader
    # took the selector from "workload" only): the same selector, not a wider filter
    with open(path) as f:
        saved = {s["name"]: s["filters"] for s in json.load(f)["event_sets"]}
    assert saved["file"]["workload"] == {"namespace": "prod", "pod": "db-*", "container": "",
                                         "labels": "app=db"}  # fmt: skip
    assert saved["net"]["workload"]["container"] == "c" and saved["file"]["follow"] is True


def test_state_of_an_older_agent_without_workload_fields_loads():
    assert Filters.from_json({"pids": [1], "comms": [], "cgroup_ids": [],
                              "path_prefixes": []}) == Filters(pids=(1,))  # fmt: skip
