"""Reliability, short soak (the CI variant of ``tests/bench/soak.py``, same code): a controller
with 300 simulated agents and one real agent, file enabled on role=db with real events
flowing, RSS, CPU and open fds of every daemon sampled every few seconds. The table and the
flatness verdicts are printed; asserted: every daemon lived, every agent stayed connected,
the real agent's events reached the controller, nothing was discarded, and after warm-up
no daemon's open fds grew (a leak; counts, not timings). RSS and CPU verdicts are printed,
not asserted: under a minute on a shared 2-CPU machine says little about them (the
10-minute run does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.soak import SoakConfig, render, run_soak
from tests.conftest import BPF_DIR, require_root

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.slow]
CFG = SoakConfig(duration=45.0, every=5.0, warmup=10.0, simulated=300, real=1, ramp=5.0)


def test_short_soak_fds_do_not_grow(tmp_path: Path):
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.skip("run `make bpf` first")
    res = run_soak(CFG, tmp_path)  # raises if a daemon dies
    print("\nRELIABILITY soak (short):\n" + render(res))
    last = res.fleet[-1]
    want = CFG.simulated + CFG.real
    assert all(f["connected"] == want for f in res.fleet), [f["connected"] for f in res.fleet]
    assert last["real_events"] > res.fleet[0]["real_events"], "real events stopped arriving"
    assert last["discarded"] == 0
    for daemon in res.series:
        v = res.verdict(daemon, "fds")
        assert v.flat, (daemon, [s.fds for s in res.series[daemon]])
