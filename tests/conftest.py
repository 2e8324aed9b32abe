"""Shared fixtures: repo paths, and skips that name what is missing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
WORKLOADS = BUILD / "workloads"
BPF_DIR = BUILD / "bpf"


def time_scale() -> float:
    """How much slower than an idle host this machine runs: 10x in the emulated guest
    (TRACEFLEET_IN_VM=1), and in proportion to the load average when the host's cores are
    oversubscribed (2 cores shared with other builds and tests)."""
    factor = 10.0 if os.environ.get("TRACEFLEET_IN_VM", "0") not in ("", "0") else 1.0
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 0.0
    return factor * max(1.0, load)


def scaled(seconds: float) -> float:
    """A deadline of ``seconds`` on an idle host, scaled to this machine (time_scale())."""
    return seconds * time_scale()


def wait_until(fn: Callable[[], Any], timeout: float = 30.0, what: str = "", every: float = 0.1):
    """Poll ``fn`` until it returns something true, and return that; fail after ``timeout``
    seconds naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(every)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_BPF, CAP_PERFMON): run the BPF suite with sudo")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def workloads() -> Path:
    if not (WORKLOADS / "cold_rodata").exists():
        pytest.skip("test workloads not built: run `make workloads`")
    return WORKLOADS
