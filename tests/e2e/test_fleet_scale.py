"""100 simulated agents in one load-generator process converge on a change."""

import signal
import time

import pytest

from tests.e2e.fleet_helpers import (
    AgentProc,
    ControllerProc,
    cli_json,
    enabled_sets,
    status,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 100


def test_100_agents_converge(tmp_path):
    ctl = ControllerProc(tmp_path, stale_after=10).start()
    sims = AgentProc(tmp_path, ctl.address, "sim", agents=N, roles="db,web").start()
    try:
        wait_until(
            lambda: sum(n["state"] == "connected" for n in status(ctl.address)["nodes"]) == N,
            timeout=60,
            what=f"{N} agents connected",
        )
        t0 = time.monotonic()
        res = cli_json(ctl.address, "enable", "file", "--selector", "role=db", "--wait")
        elapsed = time.monotonic() - t0
        print(f"\n{N} agents: enable -> all acked in {elapsed:.2f}s (CLI round trip included)")
        assert len(res["matched_nodes"]) == N // 2
        assert len(res["wait"]["applied"]) == N // 2 and res["wait"]["pending"] == []
        st = status(ctl.address)
        assert all(n["applied_generation"] == res["generation"] for n in st["nodes"])
        on = sorted(n["name"] for n in st["nodes"] if enabled_sets(n) == {"file"})
        assert on == sorted(res["matched_nodes"])
        assert all(n["labels"]["role"] == "db" for n in st["nodes"] if n["name"] in on)
        stats = wait_until(
            lambda: (
                (s := sims.stats())
                and all(x["applied_generation"] == res["generation"] for x in s)
                and s
            )
        )
        assert sum(x["enabled"] == ["file"] for x in stats) == N // 2
    finally:
        sims.stop(signal.SIGKILL)
        ctl.stop(signal.SIGKILL)
