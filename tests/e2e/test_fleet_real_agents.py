"""A controller and three real agents (real BPF, distinct node names and labels) on
loopback. Enabling `file` for role=db reaches only the db agent, whose bit is set in its
own control map (read from the kernel with bpftool); a workload's cold-page open comes back
through `tracefleet events`; when the TTL expires the bit is off again in the kernel."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.bpf.kernel_view import process_enabled_bits as control_bits
from tests.conftest import BPF_DIR, WORKLOADS, require_root, scaled
from tests.e2e.fleet_helpers import ControllerProc, nodes_by_name, status, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.bpf]
SLOW = 10 if os.environ.get("TRACEFLEET_IN_VM") else 1
if SLOW > 1:  # three agents and a controller starting in the emulated guest
    pytestmark.append(pytest.mark.timeout(1800))
AGENT = [sys.executable, "-m", "tracefleet.agent"]
NODES = {"db-1": "role=db", "web-1": "role=web", "web-2": "role=web"}


@pytest.fixture
def fleet(tmp_path: Path):
    require_root()
    if not (BPF_DIR / "file.bpf.o").exists() or not (WORKLOADS / "cold_rodata").exists():
        pytest.skip("run `make bpf workloads` first")
    # stale: not heard from for 5 s (50 in the guest, where a set's load starves the CPUs)
    ctl = ControllerProc(tmp_path, stale_after=5 * SLOW).start()
    agents: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for node, labels in NODES.items():
            log = open(tmp_path / f"{node}.log", "wb")  # noqa: SIM115
            agents[node] = subprocess.Popen(
                [*AGENT, "run", "--controller", ctl.address, "--node", node, "--labels", labels,
                 "--metrics-listen", "off", "--hold-seconds", "2"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(
            lambda: all(
                n in (by := nodes_by_name(status(ctl.address))) and by[n]["state"] == "connected"
                for n in NODES
            ),
            timeout=scaled(180),
            what="three real agents registered",
        )
        yield ctl, agents
    finally:
        for p in agents.values():
            p.send_signal(signal.SIGTERM)
        for p in agents.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        ctl.stop()


def cli(addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracefleet.controller.operator.cli",
                           "--controller", addr, *args], capture_output=True, text=True,
                          timeout=120 * SLOW)  # fmt: skip


def test_enable_for_role_reaches_only_matching_agents_and_ttl_turns_it_off(fleet):
    ctl, agents = fleet
    addr = ctl.address
    for node, proc in agents.items():
        assert control_bits(proc.pid) == 0, node

    # the kernel-side comm filter keeps the sampled stream to the workload, so the host's
    # own file activity cannot crowd it out of the sample
    # the set loads (verifier) when first enabled, ten times slower in the emulated guest:
    # no TTL yet, so that the load cannot eat it
    r = cli(addr, "enable", "file", "--selector", "role=db", "--comm", "cold_rodata",
            "--wait", "--wait-timeout", f"{60 * SLOW}s")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert control_bits(agents["db-1"].pid) & 1, r.stderr  # stderr: the wait's progress
    assert control_bits(agents["web-1"].pid) == 0
    assert control_bits(agents["web-2"].pid) == 0

    # a cold-page open comes back through the controller, from the db node only. The agents
    # sample for the stream once the controller has granted them a lease: rather than sleep
    # for it, run the workload until the stream shows one of its opens (scaled deadline)
    window = scaled(60.0)
    events = subprocess.Popen(
        [sys.executable, "-m", "tracefleet.controller.operator.cli", "--controller", addr,
         "-o", "json", "events", "--event-set", "file", "--duration", f"{window:.0f}s",
         "--count", "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(events.stdout or ()), daemon=True)
    reader.start()
    runs: list[dict] = []

    def workload_open_seen() -> bool:
        expect = {w["pid"]: w["calls"][0]["expect"] for w in runs}
        return any(
            e["pid"] in expect and e["args"].get("pathname", {}).get("value") == expect[e["pid"]]
            for e in (json.loads(ln) for ln in list(lines) if ln.strip())
        )

    deadline = time.monotonic() + window
    while not workload_open_seen() and events.poll() is None and time.monotonic() < deadline:
        out = subprocess.run([str(WORKLOADS / "cold_rodata"), "openat"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        runs.append(json.loads(out))
        with contextlib.suppress(AssertionError):  # not sampled yet: run it again
            wait_until(workload_open_seen, timeout=scaled(1.0), what="", every=0.05)
    if events.poll() is None:
        events.send_signal(signal.SIGINT)
    err = events.communicate(timeout=120)[1]
    reader.join(timeout=30)
    evs = [json.loads(ln) for ln in lines if ln.strip()]
    assert evs, f"no events at all in {window:.0f}s ({len(runs)} workload runs): {err}"
    assert {e["node"] for e in evs} == {"db-1"}
    assert {e["comm"] for e in evs} == {"cold_rodata"}
    expect = {w["pid"]: w["calls"][0]["expect"] for w in runs}
    mine = [e for e in evs if e["pid"] in expect and e["syscall"] == "openat"]
    assert mine, f"no open of the {len(runs)} workload runs among {len(evs)} events"
    # the controller's events carry no user addresses: the workload's open is its only
    # path under /proc/tf-nonexistent-dir/
    opened = [e for e in mine if e["args"]["pathname"]["value"] == expect[e["pid"]]]
    assert opened, [e["args"]["pathname"] for e in mine]
    assert all(e["args"]["pathname"]["status"] in ("ok", "recovered") for e in opened)

    # TTL: the controller switches the set off by itself; the kernel bit follows
    r = cli(addr, "enable", "file", "--selector", "role=db", "--comm", "cold_rodata",
            "--ttl", "20s", "--wait", "--wait-timeout", f"{60 * SLOW}s")  # fmt: skip
    assert r.returncode == 0, r.stderr
    wait_until(lambda: control_bits(agents["db-1"].pid) == 0, timeout=60 * SLOW,
               what="db-1's bit cleared after the TTL")  # fmt: skip
    node = nodes_by_name(status(addr))["db-1"]
    assert node["applied_generation"] == status(addr)["generation"]
