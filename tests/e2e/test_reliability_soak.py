"""Reliability, short soak (the CI variant): a controller with 300 simulated agents and one
real agent, with an event set enabled, sampled every few seconds for RSS, CPU and open fds.
The series is printed; after warm-up the number of open fds must not grow (no leak)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BPF_DIR, require_root
from tests.e2e.fleet_helpers import (
    AgentProc,
    ControllerProc,
    cli,
    nodes_by_name,
    status,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.slow]
SIMULATED = 300
SOAK_SECONDS = 45.0
EVERY = 5.0
FD_NOISE = 8
TICK = os.sysconf("SC_CLK_TCK")


def sample(pid: int) -> dict[str, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return {
        "rss_mb": rss_kb / 1024,
        "cpu_s": (int(fields[11]) + int(fields[12])) / TICK,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def test_short_soak_fds_do_not_grow(tmp_path: Path):
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.skip("run `make bpf` first")
    ctl = ControllerProc(tmp_path, stale_after=10).start()
    sims = AgentProc(tmp_path, ctl.address, "soak", roles="db,web", agents=SIMULATED)
    real: subprocess.Popen[bytes] | None = None
    try:
        sims.start()
        with open(tmp_path / "real.log", "wb") as log:
            real = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tracefleet.agent",
                    "run",
                    "--controller",
                    ctl.address,
                    "--node",
                    "soak-real",
                    "--labels",
                    "role=db",
                    "--metrics-listen",
                    "off",
                    "--hold-seconds",
                    "2",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            lambda: len(status(ctl.address)["nodes"]) >= SIMULATED + 1,
            timeout=120,
            what="every agent registered",
            every=1.0,
        )
        r = cli(ctl.address, "enable", "file", "--selector", "role=db", "--ttl", "10m")
        assert r.returncode == 0, r.stderr
        wait_until(
            lambda: (
                nodes_by_name(status(ctl.address))["soak-real"]["applied_generation"]
                == status(ctl.address)["generation"]
            ),
            timeout=60,
            what="the real agent applied file",
        )
        procs = {"controller": ctl.proc, "simulated": sims.proc, "real": real}
        series: dict[str, list[dict[str, float]]] = {k: [] for k in procs}
        t0 = time.monotonic()
        while time.monotonic() - t0 < SOAK_SECONDS:
            for name, p in procs.items():
                assert p is not None and p.poll() is None, f"{name} died"
                series[name].append(sample(p.pid))
            time.sleep(EVERY)
        st = status(ctl.address)
        connected = sum(1 for n in st["nodes"] if n["state"] == "connected")
    finally:
        if real is not None and real.poll() is None:
            real.send_signal(signal.SIGTERM)
            real.wait(timeout=30)
        sims.stop()
        ctl.stop()
    print(
        f"\nRELIABILITY soak: {SIMULATED} simulated + 1 real agent, {SOAK_SECONDS:.0f}s, "
        f"sample every {EVERY:.0f}s; {connected} connected at the end"
    )
    for name, s in series.items():
        print(f"  {name:<10} fds={[int(x['fds']) for x in s]}")
        print(f"  {'':<10} rss_mb={[round(x['rss_mb'], 1) for x in s]}")
        print(f"  {'':<10} cpu_s={[round(x['cpu_s'], 2) for x in s]}")
    assert connected == SIMULATED + 1
    for name, s in series.items():
        warm = s[1]["fds"]  # the first sample is taken right after enabling
        assert max(x["fds"] for x in s[1:]) <= warm + FD_NOISE, (name, [x["fds"] for x in s])
