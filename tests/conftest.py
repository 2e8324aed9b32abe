"""Shared fixtures: repo paths, scaled deadlines, and the skip policy: a test may skip only
for a reason the running kernel's entry of expected_skips.json lists; any other skip fails
the run at its end."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
WORKLOADS = BUILD / "workloads"
BPF_DIR = BUILD / "bpf"
# the load generator (simulated agents; no BPF): a test tool, run as a script
LOADGEN = REPO / "tests" / "loadgen.py"


def time_scale() -> float:
    """How much slower than an idle host this machine runs: 10x in the emulated guest
    (TRACEFLEET_IN_VM=1); on a host, the load average per core when its cores are
    oversubscribed (2 cores shared with other builds and tests), at most 3x."""
    if os.environ.get("TRACEFLEET_IN_VM", "0") not in ("", "0"):
        return 10.0  # the guest's own load average reflects the emulation already
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 0.0
    # capped: a deadline is for a failure to surface, and must stay under pytest's timeout
    return min(3.0, max(1.0, load))


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
    # a failure, not a skip: a BPF or e2e run as non-root must not pass empty
    if os.geteuid() != 0:
        pytest.fail("needs root (CAP_BPF, CAP_PERFMON): run the BPF and e2e suites with sudo",
                    pytrace=False)  # fmt: skip


# ---- skip policy -----------------------------------------------------------------------
EXPECTED_SKIPS = REPO / "tests" / "expected_skips.json"


def kernel_key() -> str:
    """major.minor of the running kernel, the key of expected_skips.json."""
    return ".".join(os.uname().release.split(".")[:2])


def expected_for_kernel() -> dict[str, Any]:
    table = json.loads(EXPECTED_SKIPS.read_text())
    return dict(table.get(kernel_key()) or table["default"])


def skip_if_known_refusal(rung: str, what: str, reason: str) -> None:
    """Skip if ``reason`` (a rung's load failure) is a refusal this kernel is known to make
    for ``rung``; fail otherwise: our own program failing the verifier, or a kernel refusing
    something it should allow, must not pass as a skip."""
    release = os.uname().release
    for r in expected_for_kernel()["refusals"]:
        if r["rung"] == rung and r["errno"] in reason and r["message"] in reason:
            pytest.skip(f"{rung} refused on {release} for {what} as expected "
                        f"({r['errno']}: {r['why']}): {reason}")  # fmt: skip
    pytest.fail(f"{rung} failed to load on {release} for {what}, and {EXPECTED_SKIPS.name} "
                f"lists no such refusal for kernel {kernel_key()}: {reason}. If the kernel "
                "refuses it by design, add the refusal (errno, message) there; otherwise it "
                "is a bug.", pytrace=False)  # fmt: skip


_skipped: list[tuple[str, str]] = []
_unexpected: list[tuple[str, str]] = []


def _skip_reason(report: pytest.TestReport) -> str:
    lr = report.longrepr
    text = lr[2] if isinstance(lr, tuple) else str(lr)
    return text.removeprefix("Skipped: ")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid.removeprefix("tests/"), _skip_reason(report)))


def unexpected_skips(skipped: list[tuple[str, str]], allowed: list[dict[str, str]]
                     ) -> list[tuple[str, str]]:  # fmt: skip
    """The (node id, reason) pairs that match no (test glob, reason regex) entry."""
    return [
        (node, why)
        for node, why in skipped
        if not any(
            fnmatch.fnmatchcase(node, a["test"]) and re.search(a["reason"], why) for a in allowed
        )
    ]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _unexpected[:] = unexpected_skips(_skipped, expected_for_kernel()["skips"])
    if _unexpected and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _unexpected:
        return
    tr = terminalreporter
    tr.section(f"unexpected skips (kernel {kernel_key()}, {EXPECTED_SKIPS.name})", red=True)
    for node, why in _unexpected:
        tr.line(f"{node}: {why}")
    tr.line(f"{len(_unexpected)} skip(s) not listed for this kernel: the run fails. Fix the "
            f"cause, or list an expected skip in tests/{EXPECTED_SKIPS.name}.")  # fmt: skip


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def workloads() -> Path:
    if not (WORKLOADS / "cold_rodata").exists():
        pytest.skip("test workloads not built: run `make workloads`")
    return WORKLOADS
