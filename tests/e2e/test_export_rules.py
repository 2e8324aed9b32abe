"""Per-rule export through the fleet: `tracefleet enable file --export audit` makes a real
agent (real BPF) write every event of the set to its exporter named audit, and only that one;
a rule naming an exporter the agent lacks is reported in the set's status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BPF_DIR, require_root, wait_until
from tests.e2e.fleet_helpers import stop_process
from tests.e2e.security_helpers import make_groups, make_sockdir, start_controller, tf

pytestmark = [pytest.mark.e2e, pytest.mark.bpf]
AGENT = [sys.executable, "-m", "tracefleet.agent"]
SLOW = 10 if os.environ.get("TRACEFLEET_IN_VM") else 1
COMM = "tf-export-rule"
N = 500

WORKLOAD = f"""
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, b"{COMM}", 0, 0, 0)
for i in range({N}):
    try:
        os.open(f"{{sys.argv[1]}}/r-{{i:04d}}", os.O_RDONLY)
    except FileNotFoundError:
        pass
"""


@pytest.fixture
def groups() -> Iterator[tuple[str, str]]:
    yield from make_groups()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    yield from make_sockdir()


def _lines(d: Path, stem: str) -> list[dict[str, Any]]:
    """Every whole line of the export, read while the exporter may still write and rotate:
    a file renamed between the listing and its read means listing again, and a line not
    yet ended is not read."""
    while True:
        try:
            texts = [f.read_text() for f in sorted(d.glob(f"{stem}.jsonl*"))]
        except FileNotFoundError:
            continue
        return [json.loads(ln) for t in texts for ln in t.split("\n")[:-1] if ln]


def _paths(lines: list[dict[str, Any]]) -> list[str]:
    return [e["args"]["pathname"]["value"] for e in lines
            if "type" not in e and e.get("comm") == COMM and e["syscall"] == "openat"]  # fmt: skip


def test_rule_exports_every_event_to_the_named_exporter(sockdir, groups):
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.skip("run `make bpf` first")
    d = sockdir
    out = d / "export"
    out.mkdir()
    log = d / "agent.log"
    ctl = start_controller(d, groups)
    with open(log, "ab") as f:
        agent = subprocess.Popen(
            [*AGENT, "run", "--controller", f"unix:{d}/ctl.sock", "--node", "ex-1",
             "--metrics-listen", "off", "--state-file", "off",
             "--exporter", f"audit=file:{out}/audit.jsonl,max_bytes=16K,keep=1000",
             "--exporter", f"spare=file:{out}/spare.jsonl"],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "registered with the controller" in log.read_text(),
                   180 * SLOW, "the agent to register")  # fmt: skip
        r = tf(d, "enable", "file", "--comm", COMM, "--export", "audit", "--wait")
        assert r.returncode == 0, r.stdout + r.stderr
        subprocess.run([sys.executable, "-c", WORKLOAD, str(d / "missing")], check=True,
                       timeout=120 * SLOW)  # fmt: skip
        last = f"{d}/missing/r-{N - 1:04d}"
        # one thread's records leave the ring, and the exporter's queue, in order
        wait_until(lambda: last in _paths(_lines(out, "audit")), 120 * SLOW,
                   "the workload's last event in the audit export")  # fmt: skip

        # a rule naming an exporter this agent lacks: reported, not ignored
        tf(d, "enable", "exec", "--comm", COMM, "--export", "siem", "--wait")
        st = json.loads(tf(d, "status", "-o", "json").stdout)
        [node] = [n for n in st["nodes"] if n["name"] == "ex-1"]
        errors = {s["name"]: s.get("error", "") for s in node["statuses"]}
        assert "no exporter named siem" in errors["exec"], errors
        assert "it has: audit, spare" in errors["exec"]
        assert not errors.get("file"), errors
        [rule] = [r for r in st["rules"] if r["event_set"] == "file"]
        assert rule["export"] == ["audit"]
    finally:
        stop_process(agent, timeout=60 * SLOW)
        ctl.terminate()
        ctl.wait(timeout=60)
    audit = _lines(out, "audit")
    got = _paths(audit)
    want = [f"{d}/missing/r-{i:04d}" for i in range(N)]
    assert sorted(got) == want, (len(got), sorted(set(want) - set(got))[:5])
    assert len(list(out.glob("audit.jsonl*"))) > 2  # rotated
    acct = max((e for e in audit if e.get("type") == "tracefleet.accounting"),
               key=lambda e: e["time_ns"])  # fmt: skip
    c = acct["counts"]
    assert acct["node"] == "ex-1" and acct["exporter"] == "audit"
    assert c["received"] == c["written"] + sum(c["undeliverable"].values()) + c["queued"]
    assert c["written"] == sum(1 for e in audit if "type" not in e)
    assert set(c["received_by_set"]) == {"file"}
    spare = _lines(out, "spare")
    assert spare and all(e.get("type") == "tracefleet.accounting" for e in spare)


def test_sigterm_drains_the_ring_to_the_exporter(sockdir, groups):
    """Records still in the ring when `run` gets SIGTERM reach the exporter before it exits
    (issue 19): the agent is stopped (SIGSTOP) while the workload fills its ring, then gets
    SIGTERM and SIGCONT together; every event must be in the export, exactly once."""
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists():
        pytest.skip("run `make bpf` first")
    n = 8_000  # the 8 MiB ring holds ~10,000 openat records; decoding them takes seconds
    d = sockdir
    out = d / "export"
    out.mkdir()
    log = d / "agent.log"
    ctl = start_controller(d, groups)
    with open(log, "ab") as f:
        agent = subprocess.Popen(
            [*AGENT, "run", "--controller", f"unix:{d}/ctl.sock", "--node", "ex-2",
             "--metrics-listen", "off", "--state-file", "off",
             "--exporter", f"audit=file:{out}/audit.jsonl,max_bytes=64M,keep=2"],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    stopped = False
    try:
        wait_until(lambda: "registered with the controller" in log.read_text(),
                   180 * SLOW, "the agent to register")  # fmt: skip
        r = tf(d, "enable", "file", "--comm", COMM, "--export", "audit", "--wait")
        assert r.returncode == 0, r.stdout + r.stderr
        os.kill(agent.pid, signal.SIGSTOP)
        stopped = True
        subprocess.run([sys.executable, "-c", WORKLOAD.replace(str(N), str(n)),
                        str(d / "missing")], check=True, timeout=120 * SLOW)  # fmt: skip
        os.kill(agent.pid, signal.SIGTERM)
        os.kill(agent.pid, signal.SIGCONT)
        stopped = False
        assert agent.wait(timeout=300 * SLOW) == 0, log.read_text()[-2000:]
    finally:
        if stopped:
            os.kill(agent.pid, signal.SIGCONT)
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        ctl.terminate()
        ctl.wait(timeout=60)
    audit = _lines(out, "audit")
    got = _paths(audit)
    want = [f"{d}/missing/r-{i:04d}" for i in range(n)]
    acct = max((e for e in audit if e.get("type") == "tracefleet.accounting"),
               key=lambda e: e["time_ns"])  # fmt: skip
    assert len(got) == n and sorted(got) == want, json.dumps([len(got), acct])
    # written while the engine could still be read (not after it closed)
    assert "event_sets_error" not in acct, acct
    assert acct["event_sets"]["file"]["dropped"] == 0, acct
    assert acct["event_sets"]["file"]["delivered"] >= n, acct
    assert acct["counts"]["written"] == sum(1 for e in audit if "type" not in e)
