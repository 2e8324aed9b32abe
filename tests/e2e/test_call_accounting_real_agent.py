"""Every call that passed the filters is accounted for in the controller's totals, with a
real BPF agent (`tracefleet-agent run`) and a real controller process.

The agent runs with a small --inflight-entries (which sized file's in-flight map once; file
now keeps one slot per thread) and `file` is enabled for one command name and one path
prefix. Two known workloads then run under that name:
  - PARKED threads block in openat on a FIFO under the prefix, more than that size: every
    call is delivered (none lost to a full map);
  - FILTERED opens of paths outside the prefix: they pass the entry filters and are dropped
    at exit by the path-prefix filter (counted).
The controller's totals (`tracefleet status -o json` and its /metrics) must then say, per
set, passed = delivered + dropped + discarded + lost + prefix_filtered + decode_errors, with
passed, lost and prefix_filtered equal to what the workloads made; and the entry and exit
runs the kernel skipped (outside that identity; none on this host), as the agent counts them."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BPF_DIR, WORKLOADS, require_root, scaled, wait_until
from tests.e2e.fleet_helpers import cli, stop_process
from tests.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.bpf]
AGENT = [sys.executable, "-m", "tracefleet.agent"]
NODE = "acct-1"
COMM = "tf-parker"  # the harden workload's parked threads name themselves so
ENTRIES = 64  # --inflight-entries: once the in-flight slots of the agent's `file` set
PARKED = 200  # threads parked in openat, more than ENTRIES: all delivered
FILTERED = 50  # opens outside the path prefix
OUTSIDE = f"""
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, {COMM.encode()!r}, 0, 0, 0)  # PR_SET_NAME: counted from here
for i in range({FILTERED}):
    try:
        os.open(f"{{sys.argv[1]}}/{{i}}", os.O_RDONLY)
    except FileNotFoundError:
        pass
"""
PARTS = ("delivered", "dropped", "discarded", "lost", "prefix_filtered", "decode_errors")


class Controller:
    def __init__(self, tmp: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics = free_port()
        self.log = open(tmp / "controller.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracefleet.controller.server", "--listen", self.address,
             "--insecure-listen", "--db", str(tmp / "controller.db"), "--window", "5",
             "--metrics-listen", f"127.0.0.1:{self.metrics}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


def file_totals(ctl: Controller) -> dict[str, int] | None:
    r = cli(ctl.address, "status", "-o", "json")
    if r.returncode:
        return None
    nodes = {n["name"]: n for n in json.loads(r.stdout)["nodes"]}
    if NODE not in nodes:
        return None
    tot: dict[str, Any] = {x["event_set"]: x for x in nodes[NODE].get("totals", [])}.get("file")
    if tot is None:
        return {}
    return {k: int(v) for k, v in tot.items() if k != "event_set"}


def samples(text: str, name: str, **labels: str) -> list[int]:
    """``name``'s samples whose labels include ``labels``."""
    out = []
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
        if all(have.get(k) == v for k, v in labels.items()):
            out.append(int(float(m[2])))
    return out


def metric(text: str, name: str, **labels: str) -> int:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(samples(text, name, **labels))


def _line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    p = select.poll()
    p.register(proc.stdout, select.POLLIN)
    assert p.poll(timeout * 1000), f"workload printed nothing in {timeout:.0f}s"
    return proc.stdout.readline().strip()


def test_controller_totals_account_for_every_call_that_passed(tmp_path: Path) -> None:
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists() or not (WORKLOADS / "harden").exists():
        pytest.fail("run `make bpf workloads` first", pytrace=False)
    # a short directory: a path prefix filter holds at most 64 bytes (pytest's are longer)
    short = Path(tempfile.mkdtemp(prefix="tfacct-"))
    inside, outside = short / "in", short / "out"
    inside.mkdir()
    outside.mkdir()
    fifo = inside / "fifo"
    os.mkfifo(fifo)
    ctl = Controller(tmp_path)
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
    agent_metrics = free_port()
    agent = subprocess.Popen(
        [*AGENT, "run", "--controller", ctl.address, "--node", NODE, "--labels", "role=acct",
         "--metrics-listen", f"127.0.0.1:{agent_metrics}", "--inflight-entries", str(ENTRIES)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: file_totals(ctl) is not None, timeout=scaled(180),
                   what="the real agent registered")  # fmt: skip
        r = cli(ctl.address, "enable", "file", "--selector", "role=acct", "--comm", COMM,
                "--path-prefix", str(inside), "--wait", "--wait-timeout",
                f"{scaled(60):.0f}s", timeout=scaled(90))  # fmt: skip
        assert r.returncode == 0, r.stderr

        park = subprocess.Popen([str(WORKLOADS / "harden"), "park", str(PARKED), str(fifo)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        assert park.stdin is not None
        assert _line(park, scaled(30)) == "ready"
        park.stdin.write("go\n")
        park.stdin.flush()
        assert _line(park, scaled(300)) == "parked"
        out, _ = park.communicate("go\n", timeout=scaled(120))  # release them
        assert park.returncode == 0, out
        assert json.loads(out.strip().splitlines()[-1])["opened"] == PARKED, out
        subprocess.run([sys.executable, "-c", OUTSIDE, str(outside)], check=True,
                       timeout=scaled(60))  # fmt: skip

        def settled() -> dict[str, int] | None:
            t = file_totals(ctl) or {}
            quiet = t.get("passed", 0) == PARKED + FILTERED and t["passed"] == sum(
                t.get(k, 0) for k in PARTS
            )
            return t if quiet else None

        try:
            t = wait_until(settled, timeout=scaled(60), what="the controller's totals settled")
        except AssertionError as e:
            raise AssertionError(f"{e}; controller totals of file: {file_totals(ctl)}") from e
        print(f"\nCALL ACCOUNTING controller totals of file: {t}")
        assert t["prefix_filtered"] == FILTERED, t
        assert t.get("lost", 0) == t.get("lost_inflight_full", 0) == 0, t
        assert t.get("lost_inflight_stale", 0) == t.get("lost_deleted", 0) == 0, t
        assert t["delivered"] + t["dropped"] == PARKED, t
        # the same totals on the controller's /metrics
        url = f"http://127.0.0.1:{ctl.metrics}/metrics"
        text = urllib.request.urlopen(url, timeout=30).read().decode()
        lbl = {"node": NODE, "event_set": "file"}
        assert metric(text, "tracefleet_controller_calls_passed_total", **lbl) == t["passed"]
        assert metric(text, "tracefleet_controller_calls_lost_total", **lbl) == 0
        assert metric(text, "tracefleet_controller_calls_lost_total", **lbl,
                      reason="inflight_full") == 0  # fmt: skip
        assert metric(text, "tracefleet_controller_calls_prefix_filtered_total", **lbl) == FILTERED
        # the runs the kernel skipped: once per stage, what the agent reported (its own count
        # is read later, so it may be higher)
        url = f"http://127.0.0.1:{agent_metrics}/metrics"
        own = urllib.request.urlopen(url, timeout=30).read().decode()
        skipped = []
        for stage in ("entry", "exit"):
            [n] = samples(text, "tracefleet_controller_bpf_runs_missed_total", **lbl, stage=stage)
            assert n == t.get(f"kernel_missed_{stage}", 0), (stage, t)
            [mine] = samples(own, "tracefleet_agent_bpf_runs_missed_total", **lbl, stage=stage)
            assert n <= mine, (stage, n, mine)
            skipped.append(n)
        print(f"KERNEL SKIPPED entry/exit at the controller: {skipped}")
        # and in `tracefleet status`'s table
        r = cli(ctl.address, "status")
        assert r.returncode == 0, r.stderr
        [row] = [c for ln in r.stdout.splitlines() if (c := ln.split())[:2] == [NODE, "file"]]
        assert int(row[2]) == t["passed"], r.stdout
        assert row[-2] == "0", r.stdout  # nothing pending once quiet
        assert row[-1] == "{}/{}".format(*skipped), r.stdout
    finally:
        stop_process(agent, timeout=60)
        log.close()
        ctl.stop()
        shutil.rmtree(short, ignore_errors=True)
