"""tracefleet-agent as a user runs it: probe, capture (jsonl and table), and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import WORKLOADS

pytestmark = pytest.mark.bpf
AGENT = [sys.executable, "-m", "tracefleet.agent"]


def test_probe_reports_kernel_features_and_strategy_per_set(host):
    out = subprocess.run([*AGENT, "probe"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["kernel"] == os.uname().release
    assert report["features"]["btf"] is True
    assert set(report["event_sets"]) >= {"file", "exec", "net", "vfs"}
    for name, s in report["event_sets"].items():
        rungs = ("fentry", "tracepoint") if name == "vfs" else (
            "sleepable", "fentry-sleepable", "exit-retry", "nofault")  # fmt: skip
        assert s["strategy"] in rungs, name
        last = s["attempts"][-1]
        assert (last["strategy"], last["ok"]) == (s["strategy"], True)
        assert last["reason"].startswith("loaded and attached")
        # every better rung that was refused says why
        for a in s["attempts"][:-1]:
            assert not a["ok"] and a["reason"]
            assert a["strategy"] in s["reason"]


def _release() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def test_sleepable_is_chosen_where_the_kernel_has_sleepable_tracepoints(host):
    """On Linux 7.2+ every event set must run the best rung; elsewhere the report must say
    why it did not (the kernel's refusal of a sleepable tracepoint program)."""
    out = subprocess.run([*AGENT, "probe"], capture_output=True, text=True, timeout=300)
    report = json.loads(out.stdout)
    chosen = {name: s["strategy"] for name, s in report["event_sets"].items()}
    # vfs's rungs are hooks, not ways to read user memory: on 7.2 trampolines load too
    if _release() >= (7, 2):
        assert chosen == {"file": "sleepable", "exec": "sleepable", "net": "sleepable",
                          "vfs": "fentry"}  # fmt: skip
        assert report["features"]["sleepable_tracepoints"] is True
    else:
        assert "sleepable" not in chosen.values()
        for name, s in report["event_sets"].items():
            first = "fentry" if name == "vfs" else "sleepable"
            assert s["attempts"][0]["strategy"] == first and not s["attempts"][0]["ok"]


def test_capture_jsonl_has_the_documented_fields(host, workloads, tmp_path: Path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [*AGENT, "capture", "-e", "file", "--duration", "4", "--comm", "cold_rodata",
         "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    w = json.loads(subprocess.run([str(WORKLOADS / "cold_rodata"), "openat"], capture_output=True,
                                  text=True, check=True).stdout)  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events and all(e["comm"] == "cold_rodata" for e in events)
    [ev] = [e for e in events if e["args"]["pathname"]["addr"] == w["calls"][0]["addr"]]
    for key in ("ts_ns", "event_set", "syscall", "pid", "tid", "comm", "ret", "args"):
        assert key in ev
    assert ev["pid"] == w["pid"] and ev["syscall"] == "openat" and ev["ret"] == -2
    arg = ev["args"]["pathname"]
    assert arg["value"] == w["calls"][0]["expect"]
    assert arg["status"] in ("ok", "recovered")
    assert "summary" in err and "file: events=" in err


def test_capture_refuses_unprivileged_user_with_cause_and_fix(host):
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         *AGENT, "capture", "-e", "file", "--duration", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": "/nonexistent"},
    )  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "missing privileges" in out.stderr and "fix:" in out.stderr
