"""Exactly-once with a real BPF agent as a process: `tracefleet-agent run` (real programs on
this kernel) counts a workload's openat calls, filtered in the kernel to its command name,
while the controller is SIGKILLed and restarted on the same port and database. The
controller's totals for that node must equal the number of calls the workload made, to the
event (delivered + dropped + discarded), and stay there once the agent's outbox is empty:
nothing lost, nothing counted twice. The count's source is the workload, not the agent."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BPF_DIR, require_root, scaled, wait_until
from tests.e2e.fleet_helpers import cli, stop_process
from tests.e2e.test_reliability_controller_restart import Ctl
from tests.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.slow]
AGENT = [sys.executable, "-m", "tracefleet.agent"]
COMM = "tfexactly"
CALLS = 300  # openat calls per workload run
WORKLOAD = f"""
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, {COMM.encode()!r}, 0, 0, 0)  # PR_SET_NAME: counted from here
for i in range(int(sys.argv[1])):
    try:
        os.open(f"/nonexistent-tf-exactly/{{i}}", os.O_RDONLY)
    except FileNotFoundError:
        pass
"""


def run_workload(n: int) -> None:
    subprocess.run([sys.executable, "-c", WORKLOAD, str(n)], check=True, timeout=120)


def node_total(ctl: Ctl, node: str) -> int | None:
    """delivered + dropped + discarded of `file` on ``node`` as the controller holds it."""
    r = cli(ctl.address, "status", "-o", "json")
    if r.returncode:
        return None
    nodes = {n["name"]: n for n in json.loads(r.stdout)["nodes"]}
    if node not in nodes:
        return None
    tot: dict[str, Any] = {x["event_set"]: x for x in nodes[node]["totals"]}.get("file", {})
    return sum(int(tot.get(k, 0)) for k in ("delivered", "dropped", "discarded"))


def wait_total(ctl: Ctl, want: int, timeout: float, what: str) -> None:
    try:
        wait_until(lambda: node_total(ctl, "exactly-1") == want, timeout=timeout, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; the controller counts {node_total(ctl, 'exactly-1')}") from e


def agent_gauge(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return None
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text.decode(), re.M)
    return float(m[1]) if m else None


def test_real_agent_counts_survive_controller_sigkill_exactly(tmp_path: Path) -> None:
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.fail("BPF objects not built: run `make bpf`", pytrace=False)
    ctl = Ctl(tmp_path, free_port()).start()
    mport = free_port()
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen(
        [*AGENT, "run", "--controller", ctl.address, "--node", "exactly-1",
         "--labels", "role=exactly", "--metrics-listen", f"127.0.0.1:{mport}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: node_total(ctl, "exactly-1") is not None, timeout=scaled(180),
                   what="the real agent registered")  # fmt: skip
        r = cli(ctl.address, "enable", "file", "--selector", "role=exactly", "--comm", COMM,
                "--wait", timeout=scaled(60))  # fmt: skip
        assert r.returncode == 0, r.stderr
        made = 0
        run_workload(CALLS)  # counted with the controller up
        made += CALLS
        wait_total(ctl, made, scaled(30), f"{made} calls counted before the kill")
        # SIGKILL while the next counts are produced: they wait in the agent's outbox
        ctl.kill()
        run_workload(CALLS)
        made += CALLS
        ctl.start()
        run_workload(CALLS)  # and more while the agent reconnects
        made += CALLS
        wait_total(ctl, made, scaled(60), f"all {made} calls counted after the restart")
        # every batch acknowledged: nothing is left to be counted twice
        wait_until(lambda: agent_gauge(mport, "tracefleet_agent_outbox_batches") == 0,
                   timeout=scaled(30), what="the agent's outbox empty")  # fmt: skip
        # and the totals survive another SIGKILL (they are in SQLite with their seq)
        ctl.kill()
        ctl.start()
        wait_until(lambda: node_total(ctl, "exactly-1") is not None, timeout=scaled(30),
                   what="the restarted controller's status")  # fmt: skip
        final = node_total(ctl, "exactly-1")
        print(f"\nRELIABILITY real agent exactly-once: workload made {made} openat calls; "
              f"controller counted {final} across 2 SIGKILLs")  # fmt: skip
        assert final == made
    finally:
        stop_process(agent, timeout=60)
        log.close()
        if ctl.proc is not None and ctl.proc.poll() is None:
            ctl.proc.send_signal(signal.SIGTERM)
            ctl.proc.wait(timeout=30)
