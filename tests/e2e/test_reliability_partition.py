"""Reliability: a network partition between a controller and an agent, each in a network
namespace this test creates (veth pair, 10.231.7.0/24 inside those namespaces only). Every
packet is dropped (iptables, inside the agent's namespace): the controller marks the node
stale, the agent notices, backs off, and once the drop is removed resyncs; the controller marks
it connected again. Namespaces are always deleted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import LOADGEN
from tests.e2e.fleet_helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CTL_IP, AGENT_IP, PORT = "10.231.7.1", "10.231.7.2", 7070


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"):
        pytest.skip("needs root, ip and iptables")
    tag = uuid.uuid4().hex[:6]
    a, b = f"tfrel-c-{tag}", f"tfrel-a-{tag}"
    va, vb = f"tfc{tag}", f"tfa{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        for ns, dev, ip in ((a, va, CTL_IP), (b, vb, AGENT_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, b, va, vb
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_partition_detected_and_resynced(netns, tmp_path: Path):
    a, b, _va, vb = netns
    addr = f"{CTL_IP}:{PORT}"
    ctl_log = open(tmp_path / "controller.log", "wb")  # noqa: SIM115
    ctl = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            a,
            sys.executable,
            "-m",
            "tracefleet.controller.server",
            "--listen",
            addr,
            "--insecure",
            "--db",
            ":memory:",
            "--stale-after",
            "3",
        ],
        stdout=ctl_log,
        stderr=subprocess.STDOUT,
    )
    stats = tmp_path / "agent.json"
    agent = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            b,
            sys.executable,
            str(LOADGEN),
            "--controller",
            addr,
            "--name",
            "part-1",
            "--interval",
            "0.5",
            "--backoff-max",
            "2",
            "--stats-file",
            str(stats),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "agent.log", "wb"),  # noqa: SIM115
    )

    def node_state() -> str:
        r = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                a,
                sys.executable,
                "-m",
                "tracefleet.controller.operator.cli",
                "--controller",
                addr,
                "-o",
                "json",
                "status",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode:
            return ""
        nodes = {n["name"]: n for n in json.loads(r.stdout)["nodes"]}
        return nodes.get("part-1", {}).get("state", "")

    def agent_stats() -> dict:
        try:
            return json.loads(stats.read_text())[0]
        except (OSError, ValueError, IndexError):
            return {}

    try:
        wait_until(lambda: node_state() == "connected", 60, "agent connected", every=0.3)
        connects0 = agent_stats().get("connects", 0)
        drop = [("INPUT", "-i", vb), ("OUTPUT", "-o", vb)]
        for chain, flag, dev in drop:
            sh("ip", "netns", "exec", b, "iptables", "-A", chain, flag, dev, "-j", "DROP")
        t0 = time.monotonic()
        wait_until(lambda: node_state() == "stale", 30, "controller marks the node stale", 0.2)
        stale_after = time.monotonic() - t0
        wait_until(
            lambda: agent_stats().get("connected") is False, 90, "agent notices the partition", 0.2
        )
        agent_detect = time.monotonic() - t0
        for chain, flag, dev in drop:
            sh("ip", "netns", "exec", b, "iptables", "-D", chain, flag, dev, "-j", "DROP")
        t1 = time.monotonic()
        wait_until(lambda: node_state() == "connected", 60, "node connected again", 0.2)
        recovered = time.monotonic() - t1
        s = agent_stats()
        wait_until(lambda: agent_stats().get("connects", 0) > connects0, 30, "re-registered")
        s = agent_stats()
        print(
            f"\nRELIABILITY partition (iptables DROP on the agent's veth): controller marked "
            f"stale after {stale_after:.1f}s; agent detected the dead stream after "
            f"{agent_detect:.1f}s; connected again "
            f"{recovered:.1f}s after the loss was removed; agent connects={s['connects']} "
            f"batches sent={s['batches_sent']} discarded={s['batches_discarded']}"
        )
        assert s["batches_discarded"] == 0
    finally:
        for p in (agent, ctl):
            p.terminate()
        for p in (agent, ctl):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
