"""Reliability: the controller is SIGKILLed under load and restarted on the same port and
database. Simulated agents (SyntheticEngine, in this process, so what each one produced is
known exactly) keep their last desired state, buffer their aggregates, reconnect, and the
two controller processes together account for what the agents produced; the gap is the
batches the dying controller had accepted on the wire but not counted."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.fleet_helpers import cli, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
AGENTS = 20
METRIC = re.compile(
    r"^tracefleet_controller_events_(delivered|dropped)_total\{([^}]*)\} ([0-9.e+]+)$", re.M
)


class Ctl:
    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port, self.address = tmp, port, f"127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics = 0

    def start(self) -> Ctl:
        self.metrics = free_port()
        log = open(self.tmp / "controller.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tracefleet.controller.server",
                "--listen",
                self.address,
                "--db",
                str(self.tmp / "c.db"),
                "--stale-after",
                "2",
                "--window",
                "5",
                "--metrics-listen",
                f"127.0.0.1:{self.metrics}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def totals(self) -> dict[str, int] | None:
        """{delivered, dropped} of the file set over every node, from /metrics."""
        try:
            url = f"http://127.0.0.1:{self.metrics}/metrics"
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            return None
        out = {"delivered": 0, "dropped": 0}
        for kind, labels, value in METRIC.findall(text):
            if 'event_set="file"' in labels and 'node="rel-' in labels:
                out[kind] += int(float(value))
        return out


async def _wait(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def test_controller_sigkill_and_restart_under_load(tmp_path: Path):
    from tracefleet.agent._internal.loadgen import SyntheticEngine
    from tracefleet.agent.controlclient import ClientOptions, ControlClient

    port = free_port()
    ctl = Ctl(tmp_path, port).start()
    opts = ClientOptions(
        interval=0.2,
        backoff_initial=0.2,
        backoff_max=1.0,
        buffer_budget=600,
        offload_engine_calls=False,
        agent_version="reliability",
    )
    engines = [SyntheticEngine(2000, seed=i) for i in range(AGENTS)]
    clients = [
        ControlClient(e, ctl.address, f"rel-{i:02d}", {"role": "rel"}, opts)
        for i, e in enumerate(engines)
    ]
    report: dict[str, object] = {}

    async def scenario() -> None:
        stop = asyncio.Event()
        runs = [asyncio.create_task(c.run(stop)) for c in clients]
        try:
            await _wait(lambda: ctl.totals() is not None, 30, "controller metrics")
            await _wait(lambda: all(c.connected for c in clients), 30, "agents connected")
            r = await asyncio.to_thread(
                cli, ctl.address, "enable", "file", "--selector", "role=rel", "--wait"
            )
            assert r.returncode == 0, r.stderr
            gen = max(c.applied_generation for c in clients)
            await _wait(lambda: all(e.enabled() == ["file"] for e in engines), 10, "enabled")
            await asyncio.sleep(2)
            before = await asyncio.to_thread(ctl.totals)
            assert ctl.proc is not None
            ctl.proc.send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            ctl.proc.wait()
            assert before is not None
            detect = await _wait(
                lambda: not any(c.connected for c in clients),
                30,
                "agents noticed the controller is gone",
            )
            await asyncio.sleep(3)  # the outage
            # fail-static: the last desired state is still applied everywhere
            assert all(e.enabled() == ["file"] for e in engines)
            assert all(c.applied_generation == gen for c in clients)
            buffered = sum(len(c._outbox) for c in clients)
            budget_max = max(len(c._outbox) for c in clients)
            ctl.start()
            t_up = time.monotonic()
            await _wait(lambda: ctl.totals() is not None, 30, "restarted controller")
            await _wait(
                lambda: all(c.connected and c._synced for c in clients),
                30,
                "agents reconnected and resynced",
            )
            recovery = time.monotonic() - t_up
            # the restarted controller still wants file on (desired state is in SQLite)
            assert all(e.enabled() == ["file"] for e in engines)
            await asyncio.sleep(1)
            r = await asyncio.to_thread(cli, ctl.address, "disable", "file", "--wait")
            assert r.returncode == 0, r.stderr
            await _wait(lambda: all(not e.enabled() for e in engines), 10, "disabled")
            await asyncio.sleep(0.6)  # one more collect interval: the last counts go out
            await _wait(lambda: all(not c._outbox for c in clients), 10, "outboxes drained")
            await asyncio.sleep(0.5)
            after = await asyncio.to_thread(ctl.totals)
            assert after is not None
            report.update(
                before=before,
                after=after,
                detect=detect,
                recovery=recovery,
                outage=t_up - t_kill,
                buffered=buffered,
                budget_max=budget_max,
            )
        finally:
            stop.set()
            await asyncio.gather(*runs, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        if ctl.proc is not None and ctl.proc.poll() is None:
            ctl.proc.send_signal(signal.SIGTERM)
            ctl.proc.wait(timeout=30)
    produced = {"delivered": 0, "dropped": 0}
    for e in engines:
        t = e.totals().get("file")
        if t is not None:
            produced["delivered"] += t.delivered
            produced["dropped"] += t.dropped
    discarded = sum(c.stats.batches_discarded for c in clients)
    before, after = report["before"], report["after"]
    assert isinstance(before, dict) and isinstance(after, dict)
    received = {k: before[k] + after[k] for k in produced}
    total_produced = produced["delivered"] + produced["dropped"]
    total_received = received["delivered"] + received["dropped"]
    lost = total_produced - total_received
    print(
        f"\nRELIABILITY controller SIGKILL: {AGENTS} agents; detected in "
        f"{report['detect']:.2f}s; outage {report['outage']:.1f}s with {report['buffered']} "
        f"batches buffered (max {report['budget_max']}/agent of budget 600, "
        f"{discarded} discarded); resynced {report['recovery']:.2f}s after restart; "
        f"produced {total_produced} events (delivered {produced['delivered']} + dropped "
        f"{produced['dropped']}), controllers counted {total_received} (first "
        f"{sum(before.values())} at last scrape before the kill, restarted "
        f"{sum(after.values())}); unaccounted {lost} "
        f"({100 * lost / max(1, total_produced):.2f}%)"
    )
    assert discarded == 0
    assert lost >= 0, "the controllers counted more than the agents produced"
    # the only unaccounted events are those of the interval(s) the first controller
    # received between its last scrape and the SIGKILL: at most ~1 s of production
    assert lost <= AGENTS * 2000 * 1.5, lost
