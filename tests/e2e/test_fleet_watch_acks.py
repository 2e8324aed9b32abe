"""`tracefleet enable --wait` follows the controller's WatchAcks stream: it returns when the
last matched agent acknowledges, and names the agents that did not within --wait-timeout.

One simulated agent runs in its own load-generator process, frozen with SIGSTOP: its stream
stays open but it acknowledges nothing, and after --stale-after it is no longer "seen"."""

import json
import os
import signal
import subprocess

import pytest

from tests.e2e.fleet_helpers import (
    PY,
    AgentProc,
    ControllerProc,
    cli,
    nodes_by_name,
    status,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 10
SCALE = 10 if os.environ.get("TRACEFLEET_IN_VM") == "1" else 1


def _fleet(tmp_path):
    ctl = ControllerProc(tmp_path, stale_after=2).start()
    fast = AgentProc(tmp_path, ctl.address, "fast", agents=N, roles="db").start()
    slow = AgentProc(tmp_path, ctl.address, "slow", labels="role=db").start()
    wait_until(
        lambda: sum(n["state"] == "connected" for n in status(ctl.address)["nodes"]) == N + 1,
        timeout=60 * SCALE,
        what=f"{N + 1} agents connected",
    )
    return ctl, fast, slow


def _freeze_until_stale(ctl, slow):
    """SIGSTOP the slow agent and wait until the controller stops hearing from it: a
    stale node with an open stream must still be waited for."""
    slow.proc.send_signal(signal.SIGSTOP)
    wait_until(
        lambda: nodes_by_name(status(ctl.address))["slow"]["state"] == "stale",
        timeout=60 * SCALE,
        what="the frozen agent reported stale",
    )


def test_wait_returns_when_the_last_matched_agent_acks(tmp_path):
    ctl, fast, slow = _fleet(tmp_path)
    try:
        _freeze_until_stale(ctl, slow)
        cmd = [PY, "-m", "tracefleet.controller.operator.cli", "--controller", ctl.address,
               "-o", "json", "enable", "file", "--selector", "role=db", "--wait",
               "--wait-timeout", str(300 * SCALE)]  # fmt: skip
        waiter = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # progress is pushed: the line for "every agent but the frozen one" comes first
            want = f"{N}/{N + 1} connected node(s) applied"
            seen = []
            assert waiter.stderr is not None
            for line in waiter.stderr:
                seen.append(line)
                if want in line:
                    break
            assert any(want in x for x in seen), "".join(seen)
            # the frozen agent is stale (not heard from) but its stream is open: still waited
            st = nodes_by_name(status(ctl.address))
            assert st["slow"]["state"] == "stale" and st["slow"]["pending"]
            assert waiter.poll() is None, "".join(seen) + waiter.stderr.read()
            slow.proc.send_signal(signal.SIGCONT)
            out, err = waiter.communicate(timeout=120 * SCALE)
        finally:
            if waiter.poll() is None:
                waiter.kill()
        assert waiter.returncode == 0, "".join(seen) + err
        res = json.loads(out)
        assert res["wait"]["pending"] == [] and res["wait"]["not_connected"] == []
        assert sorted(res["wait"]["applied"]) == sorted(res["matched_nodes"])
        assert "slow" in res["wait"]["applied"] and len(res["wait"]["applied"]) == N + 1
        assert f"{N + 1}/{N + 1} connected node(s) applied" in "".join(seen) + err
        gen = res["generation"]
        assert nodes_by_name(status(ctl.address))["slow"]["applied_generation"] >= gen
    finally:
        slow.proc.send_signal(signal.SIGCONT)
        slow.stop(signal.SIGKILL)
        fast.stop(signal.SIGKILL)
        ctl.stop(signal.SIGKILL)


def test_wait_names_the_agents_that_did_not_ack_within_the_timeout(tmp_path):
    ctl, fast, slow = _fleet(tmp_path)
    try:
        _freeze_until_stale(ctl, slow)
        r = cli(ctl.address, "-o", "json", "enable", "file", "--selector", "role=db", "--wait",
                "--wait-timeout", "2", timeout=120 * SCALE)  # fmt: skip
        assert r.returncode == 5, r.stderr
        res = json.loads(r.stdout)
        assert res["wait"]["pending"] == ["slow"], res["wait"]
        assert sorted(res["wait"]["applied"]) == sorted(set(res["matched_nodes"]) - {"slow"})
        assert len(res["wait"]["applied"]) == N
        assert "timed out after 2s; still pending: slow" in r.stderr
    finally:
        slow.proc.send_signal(signal.SIGCONT)
        slow.stop(signal.SIGKILL)
        fast.stop(signal.SIGKILL)
        ctl.stop(signal.SIGKILL)
