"""The skip policy of tests/conftest.py: which skips expected_skips.json allows."""

from __future__ import annotations

import json
import re

from tests.conftest import EXPECTED_SKIPS, unexpected_skips


def test_every_kernel_entry_is_well_formed() -> None:
    table = json.loads(EXPECTED_SKIPS.read_text())
    assert {"default", "6.18", "7.2"} <= set(table)
    for key, entry in table.items():
        if key == "about":
            continue
        for r in entry["refusals"]:
            assert r["rung"] and r["errno"] and r["why"], (key, r)
        for s in entry["skips"]:
            re.compile(s["reason"])
            assert s["test"], (key, s)


def test_only_listed_skips_pass() -> None:
    allowed = json.loads(EXPECTED_SKIPS.read_text())["6.18"]["skips"]
    sleepable = "sleepable refused on 6.18.44 for file as expected (Invalid argument: x): y"
    fentry_s = "fentry-sleepable refused on 6.18.44 for net as expected (Operation not ...): y"
    node = "bpf/test_capture_cold.py::test_x[openat-True-sleepable]"
    assert unexpected_skips([(node, sleepable), (node, fentry_s)], allowed) == []
    # a refusal of the exit-retry rung, or a skip for any other reason, is not expected
    other = [
        (node, "exit-retry refused on 6.18.44 for file as expected (x): y"),
        (node, "host cannot run BPF capture"),
        ("e2e/test_x.py::test_y", "sleepable refused on 6.18.44 for file as expected"),
    ]
    assert unexpected_skips(other, allowed) == other
