"""deploy/prometheus: `promtool check rules` and `promtool test rules` (the rules' own unit
tests in tracefleet-rules.test.yaml: fault rate, stale agent, rising drops, pending acks)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROM = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package prometheus; deploy/host/install-deps.sh)",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=PROM, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules():
    out = _promtool("check", "rules", "tracefleet-rules.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_test_rules():
    out = _promtool("test", "rules", "tracefleet-rules.test.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
