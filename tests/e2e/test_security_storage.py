"""Fail-safe storage (issue 15): a real controller with its SQLite database on a tiny tmpfs
that fills up. Expiry (and disable) still switch tracing off and reach the agents; enabling is
refused with a clear error; node records that could not be written are kept and written
later; errors are counted one-liners; a damaged database stops start-up naming the file and
the fix."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, wait_until
from tests.e2e.fleet_helpers import PY
from tests.e2e.security_helpers import (
    RawAgent,
    start_controller,
    tf,
)
from tracefleet.v1 import agent_pb2


@pytest.fixture
def tiny(sockdir: Path) -> Iterator[Path]:
    require_root()
    d = sockdir / "db"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def fill(d: Path) -> None:
    r = subprocess.run(["dd", "if=/dev/zero", f"of={d}/fill", "bs=4k"], capture_output=True)
    assert b"No space left" in r.stderr, r.stderr


def enabled(msg: agent_pb2.ControllerMessage) -> set[str]:
    return {s.name for s in msg.desired_state.event_sets if s.enabled}


def wait_desired(agent: RawAgent, want: set[str], timeout: float) -> agent_pb2.ControllerMessage:
    deadline = time.monotonic() + timeout
    while True:
        msg = agent.wait_for("desired_state", max(1.0, deadline - time.monotonic()))
        if enabled(msg) == want:
            return msg


def status(d: Path) -> dict:
    r = tf(d, "-o", "json", "status")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_full_disk_still_switches_tracing_off(sockdir: Path, groups, tiny: Path) -> None:
    db = tiny / "c.db"
    proc = start_controller(sockdir, groups, "--db", str(db))
    agent = agent2 = None
    try:
        agent = RawAgent(f"unix:{sockdir}/ctl.sock", "db-1")
        wait_desired(agent, set(), 60)
        assert tf(sockdir, "enable", "net").returncode == 0
        assert tf(sockdir, "enable", "file", "--ttl", "8s").returncode == 0
        wait_desired(agent, {"file", "net"}, 60)
        expires = next(r for r in status(sockdir)["rules"] if r["event_set"] == "file")
        fill(tiny)

        r = tf(sockdir, "enable", "exec")
        assert r.returncode == 4, r.stderr
        assert f"database {db} cannot be written" in r.stderr and "disable and TTL" in r.stderr
        # less tracing always applies
        assert tf(sockdir, "disable", "net").returncode == 0
        wait_desired(agent, {"file"}, 60)
        # a node that registers now cannot be written yet
        agent2 = RawAgent(f"unix:{sockdir}/ctl.sock", "db-2")
        wait_desired(agent2, {"file"}, 60)
        # the TTL runs out: pushed although the expiry cannot be written
        wait_desired(agent, set(), 120)
        late = time.time() - _ts(expires["expires_at"])
        print(f"expiry reached the agent {late:.1f}s after the TTL (disk full)")
        log = (sockdir / "controller.log").read_text()
        assert "Traceback" not in log, log[-2000:]
        assert "write failure(s) so far; retried" in log
        assert "TTL expired for file" in log

        (tiny / "fill").unlink()
        wait_until(
            lambda: "writable again" in (sockdir / "controller.log").read_text(),
            120, "the pending rules to be saved",
        )  # fmt: skip
        gen = status(sockdir)["generation"]
    finally:
        for a in (agent, agent2):
            if a is not None:
                a.close()
        proc.terminate()
        proc.wait(timeout=60)
    proc = start_controller(sockdir, groups, "--db", str(db))
    try:
        st = status(sockdir)
        rules = {r["event_set"]: r for r in st["rules"]}
        assert rules["file"]["enabled"] and rules["file"]["expired"], rules  # saved later
        assert not rules["net"]["enabled"], rules
        assert "exec" not in rules or not rules["exec"]["enabled"]
        assert st["generation"] >= gen
        assert {"db-1", "db-2"} <= {n["name"] for n in st["nodes"]}  # db-2 written later
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _ts(value: object) -> float:
    if isinstance(value, int | float):
        return float(value)
    from datetime import datetime

    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def start_fails(db: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "tracefleet.controller.server", "--listen", f"unix:{db.parent}/x.sock",
         "--db", str(db)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_damaged_database_names_the_file_and_the_fix(sockdir: Path, groups) -> None:
    db = sockdir / "c.db"
    proc = start_controller(sockdir, groups, "--db", str(db))
    assert tf(sockdir, "enable", "file", "--ttl", "1h").returncode == 0
    proc.terminate()
    proc.wait(timeout=60)
    with sqlite3.connect(db) as c:
        c.execute("UPDATE rules SET filters = '{bad json' WHERE event_set = 'file'")
    r = start_fails(db)
    assert r.returncode == 2, r.stderr
    assert f"the database {db} is damaged" in r.stderr and f"mv {db} {db}.damaged" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    other = sockdir / "garbage.db"
    other.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)
    r = start_fails(other)
    assert r.returncode == 2 and f"the database {other} is damaged" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
