"""Fail-static agents (issue 15): a real agent (real BPF) saves the desired state it applied,
with the TTL deadlines, and when it restarts while the controller is away it re-applies that
state (read back from its own control map in the kernel), minus what expired meanwhile; it
logs when it registers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bpf.kernel_view import process_enabled_bits as control_bits
from tests.conftest import BPF_DIR, require_root, wait_until
from tests.e2e.security_helpers import make_groups, make_sockdir, start_controller, tf

pytestmark = [pytest.mark.e2e, pytest.mark.bpf]
AGENT = [sys.executable, "-m", "tracefleet.agent"]
FILE, EXEC = 1 << 0, 1 << 1  # TF_SET_FILE, TF_SET_EXEC
SLOW = 10 if os.environ.get("TRACEFLEET_IN_VM") else 1


@pytest.fixture
def groups() -> Iterator[tuple[str, str]]:
    yield from make_groups()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    yield from make_sockdir()


def start_agent(d: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*AGENT, "run", "--controller", f"unix:{d}/ctl.sock", "--node", "fs-1",
             "--metrics-listen", "off", "--hold-seconds", "2",
             "--state-file", str(d / "agent-state.json")],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=60 * SLOW)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def bits(p: subprocess.Popen) -> int:
    try:
        return control_bits(p.pid)
    except Exception:  # the map is not created yet
        return -1


def test_agent_reapplies_its_saved_state_while_the_controller_is_away(sockdir, groups):
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.skip("run `make bpf` first")
    d, log = sockdir, sockdir / "agent.log"
    ctl = start_controller(d, groups)
    agent = start_agent(d, log)
    try:
        t0 = time.monotonic()
        wait_until(lambda: "registered with the controller" in log.read_text(),
                   180 * SLOW, "the agent to register")  # fmt: skip
        print(f"registration took {time.monotonic() - t0:.1f}s")
        exec_ttl = 20 * SLOW
        assert tf(d, "enable", "file", "--ttl", "1h", "--wait").returncode == 0
        r = tf(d, "enable", "exec", "--ttl", f"{exec_ttl}s", "--wait")
        assert r.returncode == 0, r.stderr
        exec_deadline = time.time() + exec_ttl
        wait_until(lambda: bits(agent) == FILE | EXEC, 60 * SLOW, "file and exec on")
        saved = json.loads((d / "agent-state.json").read_text())
        deadlines = {s["name"]: s["expires_at"] for s in saved["event_sets"] if s["enabled"]}
        assert set(deadlines) == {"file", "exec"} and all(deadlines.values()), saved

        ctl.terminate()
        ctl.wait(timeout=60)
        stop(agent)
        # exec's TTL runs out while both are down
        time.sleep(max(0.0, exec_deadline - time.time()) + 1)

        agent = start_agent(d, log)
        wait_until(lambda: bits(agent) == FILE, 180 * SLOW, "the saved file rule re-applied")
        text = log.read_text()
        assert "controller away: re-applied the saved state" in text
        assert "(enabled: file until" in text

        # the controller comes back: its state replaces the saved one
        ctl = start_controller(d, groups)
        offset = len(text)
        wait_until(lambda: "registered with the controller" in log.read_text()[offset:],
                   180 * SLOW, "the agent to register again")  # fmt: skip
        assert tf(d, "disable", "file", "--wait").returncode == 0
        wait_until(lambda: bits(agent) == 0, 60 * SLOW, "file off")
    finally:
        stop(agent)
        ctl.terminate()
        ctl.wait(timeout=60)
