"""The README's first commands without root (issue 21): `make test` / `make demo` stop
before running anything, naming the cause and the fix; sudo is offered only where it is
installed (a fresh root-only Debian machine has none). Run as nobody (via setpriv when
this suite runs as root), with `make -n`, so nothing is executed either way."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def as_unprivileged(argv: list[str], path: str = BASE_PATH) -> subprocess.CompletedProcess[str]:
    prefix = NOBODY if os.geteuid() == 0 else []
    env = {"PATH": path, "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    if prefix:
        probe = subprocess.run([*prefix, "test", "-r", str(REPO / "Makefile")], env=env)
        if probe.returncode:
            pytest.skip(f"nobody cannot read {REPO}/Makefile (checkout in a private home)")
    return subprocess.run(
        [*prefix, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def sudo_installed(path: str) -> bool:
    return shutil.which("sudo", path=path) is not None


@pytest.mark.parametrize("goal", ["test", "demo", "test-vm", "bench"])
def test_root_goals_stop_at_once_without_root(goal: str):
    r = as_unprivileged(["make", "-n", goal])
    assert r.returncode == 2, r
    assert r.stdout == "", f"make would have run commands before stopping: {r.stdout}"
    who = "nobody" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    assert f"make {goal}: needs root:" in r.stderr and who in r.stderr, r.stderr
    fix = f"fix: sudo make {goal}" if sudo_installed(BASE_PATH) else f"su -c 'make {goal}'"
    assert fix in r.stderr, r.stderr
    assert "not run as root" in r.stderr, r.stderr


def test_fix_offers_sudo_only_where_it_exists():
    bindir = Path(tempfile.mkdtemp(prefix="tf-fake-sudo-"))  # readable by nobody
    try:
        bindir.chmod(0o755)
        (bindir / "sudo").write_text("#!/bin/sh\nexit 0\n")
        (bindir / "sudo").chmod(0o755)
        with_sudo = as_unprivileged(["make", "-n", "test"], path=f"{bindir}:{BASE_PATH}")
    finally:
        shutil.rmtree(bindir)
    assert "fix: sudo make test" in with_sudo.stderr, with_sudo.stderr
    if not sudo_installed(BASE_PATH):
        without = as_unprivileged(["make", "-n", "test"])
        assert "sudo is not installed here" in without.stderr, without.stderr
        assert "sudo make" not in without.stderr, without.stderr


def test_goals_without_root_needs_still_run_unprivileged():
    r = as_unprivileged(["make", "-n", "test-unit", "lint"])
    assert r.returncode == 0, r
    assert "pytest tests/unit" in r.stdout and "ruff check" in r.stdout


def test_root_runs_the_goals_without_sudo():
    if os.geteuid() != 0:
        pytest.skip("the root half needs root")
    env = {"PATH": BASE_PATH, "HOME": "/root"}
    r = subprocess.run(["make", "-n", "test", "demo"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r
    assert "needs root" not in r.stderr and "install-deps.sh" in r.stdout, r
    assert "deploy/host/demo.py" in r.stdout and "tests/vm/run.py" in r.stdout
    assert "sudo" not in r.stdout
