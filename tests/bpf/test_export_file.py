"""The JSON lines file exporter under rotation, through a real agent capturing real syscalls:
every event of a workload lands exactly once across the files (or is counted as rotated out
when the rotation deletes its file), and the agent's counts reconcile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.bpf
AGENT = [sys.executable, "-m", "tracefleet.agent"]
SCALE = 10 if os.environ.get("TRACEFLEET_IN_VM") == "1" else 1
COMM = "tf-export-wl"
N = 3000

# renames itself (the agent filters on comm), then opens N distinct missing paths
WORKLOAD = f"""
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, b"{COMM}", 0, 0, 0)
d = sys.argv[1]
for i in range({N}):
    try:
        os.open(f"{{d}}/p-{{i:05d}}", os.O_RDONLY)
    except FileNotFoundError:
        pass
"""


def _run(tmp_path: Path, max_bytes: str, keep: int) -> tuple[list[dict[str, Any]], str, Path]:
    out = tmp_path / "out"
    out.mkdir()
    export = out / "events.jsonl"
    ready = tmp_path / "ready"
    agent = subprocess.Popen(
        [*AGENT, "capture", "-e", "file", "--comm", COMM, "-o", "jsonl",
         "--export-file", str(export), "--export-file-max-bytes", max_bytes,
         "--export-file-keep", str(keep), "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: ready.exists() or agent.poll() is not None, 120 * SCALE,
                   "the agent to start capturing")  # fmt: skip
        assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
        subprocess.run([sys.executable, "-c", WORKLOAD, str(tmp_path / "missing")], check=True,
                       timeout=120 * SCALE)  # fmt: skip
        # records are committed at the syscall's exit: the agent drains the ring on SIGINT
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=120 * SCALE)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, err
    lines: list[dict[str, Any]] = []
    for f in sorted(out.iterdir()):
        text = f.read_text()
        assert text.endswith("\n"), f"{f.name}: a cut line"
        lines += [json.loads(line) for line in text.splitlines()]
    return lines, err, out


def _paths(lines: list[dict[str, Any]]) -> list[str]:
    return [e["args"]["pathname"]["value"] for e in lines
            if "type" not in e and e["syscall"] == "openat"]  # fmt: skip


def _last_accounting(lines: list[dict[str, Any]]) -> dict[str, Any]:
    acct = [e for e in lines if e.get("type") == "tracefleet.accounting"]
    assert acct, "no accounting record in the export"
    return max(acct, key=lambda a: a["time_ns"])


def test_every_event_exactly_once_across_rotated_files(host, tmp_path: Path):
    lines, err, out = _run(tmp_path, "16K", keep=1000)
    files = sorted(out.iterdir())
    assert len(files) > 10, f"expected many rotations, got {[f.name for f in files]}"
    for f in files:  # a line is never split, a file never exceeds the bound
        assert f.stat().st_size <= 16 << 10
    want = [f"{tmp_path}/missing/p-{i:05d}" for i in range(N)]
    got = _paths(lines)
    dup = {p for p in got if got.count(p) > 1} if len(got) != len(set(got)) else set()
    assert not dup, f"duplicated across files: {sorted(dup)[:5]}"
    acct = _last_accounting(lines)
    counts, sets = acct["counts"], acct["event_sets"]
    missing = sorted(set(want) - set(got))
    # counted by the exporter: queue full, write or serialize failures, left at shutdown
    lost = sum(n for c, n in counts["undeliverable"].items() if c != "rotated_out")
    fs = sets["file"]
    # whatever is missing is accounted for in the stream: by the kernel (ring full; program
    # runs it skipped under load, as the 7.2 guest does: a skipped entry is `missed`, a
    # skipped exit leaves an entry `in_flight` or `lost` once reaped) or by the exporter
    kernel = fs["dropped"] + fs["lost"] + fs["in_flight"] + fs["missed"]
    assert len(missing) <= kernel + lost, (
        f"{len(missing)} of {N} missing (first {missing[:3]}, last {missing[-3:]}), "
        f"not counted: counts={counts} file set={sets['file']}; agent stderr:\n{err[-3000:]}"
    )
    events = [e for e in lines if "type" not in e]
    assert counts["written"] == len(events)
    assert counts["received"] == counts["written"] + sum(counts["undeliverable"].values())
    assert counts["queued"] == 0
    assert counts["undeliverable"]["rotated_out"] == 0
    # the exporter saw every event the engine delivered (no user-space filter here)
    assert sets["file"]["delivered"] == counts["received"] + sets["file"]["record_errors"]
    # the schema of capture -o jsonl, plus the node
    ev = events[0]
    assert {"ts_ns", "time", "event_set", "syscall", "pid", "comm", "ret", "args", "node"} <= set(
        ev
    )
    assert ev["comm"] == COMM and ev["node"] == os.uname().nodename


def test_rotation_keeps_a_bounded_number_of_files_and_counts_what_it_deletes(host, tmp_path):
    lines, _err, out = _run(tmp_path, "16K", keep=2)
    names = sorted(f.name for f in out.iterdir())
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"], names
    acct = _last_accounting(lines)
    counts = acct["counts"]
    events = [e for e in lines if "type" not in e]
    rotated_out = counts["undeliverable"]["rotated_out"]
    assert rotated_out > 0
    assert counts["written"] == len(events)
    # every event received is either in the files kept or counted as deleted with a file
    assert counts["received"] == len(events) + sum(counts["undeliverable"].values())
    got = _paths(lines)
    assert len(got) == len(set(got))
    # the files kept hold the newest events: the last path of the workload is there
    assert f"{tmp_path}/missing/p-{N - 1:05d}" in got
    assert time.time_ns() >= acct["time_ns"]
