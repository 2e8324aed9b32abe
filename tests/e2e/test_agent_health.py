"""`tracefleet-agent run` serves /healthz and /readyz on its metrics port (the DaemonSet's
probes): both 200 once it runs and is registered; with the controller gone /readyz turns 503
naming the cause while /healthz (the consumer) stays 200, and both recover. Real agent."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import BPF_DIR, require_root
from tests.e2e.fleet_helpers import ControllerProc, stop_process, wait_until
from tests.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.bpf]
AGENT = [sys.executable, "-m", "tracefleet.agent"]
DEADLINE = 180.0 * (10 if os.environ.get("TRACEFLEET_IN_VM") else 1)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:  # not listening yet
        return 0, str(e)


def test_run_serves_health_and_readiness(tmp_path: Path):
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.skip("run `make bpf` first")
    ctl = ControllerProc(tmp_path, stale_after=5).start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen(
        [*AGENT, "run", "--controller", ctl.address, "--node", "health-1",
         "--metrics-listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: _get(base + "/readyz")[0] == 200, DEADLINE, "/readyz 200")
        status, body = _get(base + "/healthz")
        assert status == 200 and "consumer alive" in body, body
        ctl.stop()
        _, body = wait_until(lambda: (r := _get(base + "/readyz"))[0] == 503 and r, DEADLINE,
                             "/readyz 503 without the controller")  # fmt: skip
        assert "not registered with the controller" in body, body
        assert _get(base + "/healthz")[0] == 200
        assert _get(base + "/metrics")[0] == 200
        ctl.start()
        wait_until(lambda: _get(base + "/readyz")[0] == 200, DEADLINE, "/readyz 200 again")
    finally:
        stop_process(agent, timeout=60)
        ctl.stop()
        log.close()
