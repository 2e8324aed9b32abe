"""Section 4: control plane. A real tracefleet-controller process on loopback; fleets of 1 real
agent (`tracefleet-agent run`, BPF) and N simulated agents (the load generator,
tracefleet.agent._internal.loadgen). Per round: ConfigureEventSet(file, enabled) over gRPC,
then GetStatus polled every few ms until every matched node acked the generation
(enable-to-acked, per node and for all), and a StreamEvents follower on one matched node
timestamps the first event (enable-to-first-event); then disable and wait for the acks."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench.common import (
    AGENT_CLI,
    LOOP,
    PY,
    cpu_percent,
    log,
    percentile,
    proc_sample,
    summary,
)

POLL_S = 0.005


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _proc(cmd: list[str], logf: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(logf, "ab") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Fleet:
    def __init__(self, address: str) -> None:
        import grpc

        from tracefleet.v1 import control_pb2, control_pb2_grpc

        self.pb = control_pb2
        self.channel = grpc.insecure_channel(address)
        self.stub = control_pb2_grpc.ControlServiceStub(self.channel)
        self.call_s: list[float] = []

    def nodes(self, selector: str = "") -> list[Any]:
        st = self.stub.GetStatus(self.pb.GetStatusRequest(selector=selector), timeout=30)
        return list(st.nodes)

    def connected(self, selector: str) -> int:
        return sum(n.state == self.pb.NODE_STATE_CONNECTED for n in self.nodes(selector))

    def wait_connected(self, selector: str, n: int, timeout: float) -> float:
        t0 = time.monotonic()
        while self.connected(selector) < n:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"only {self.connected(selector)}/{n} agents connected "
                                   f"after {timeout:.0f}s")  # fmt: skip
            time.sleep(0.2)
        return time.monotonic() - t0

    def configure(self, selector: str, enabled: bool) -> tuple[int, list[str], float]:
        req = self.pb.ConfigureEventSetRequest(event_set="file", enabled=enabled,
                                               selector=selector if enabled else "")  # fmt: skip
        t0 = time.monotonic()
        resp = self.stub.ConfigureEventSet(req, timeout=30)
        return int(resp.generation), list(resp.matched_nodes), t0

    def wait_acked(self, selector: str, gen: int, names: set[str], t0: float,
                   timeout: float) -> tuple[float, dict[str, float]]:  # fmt: skip
        """Seconds from t0 until every node of ``names`` applied ``gen``; per-node times.
        The duration of each GetStatus call (the resolution of the per-node times, and load
        this measurement adds to the controller) is kept in ``self.call_s``."""
        acked: dict[str, float] = {}
        while True:
            c0 = time.monotonic()
            nodes = self.nodes(selector)
            self.call_s.append(time.monotonic() - c0)
            now = time.monotonic() - t0
            for n in nodes:
                if n.name in names and n.name not in acked and n.applied_generation >= gen:
                    acked[n.name] = now
            if len(acked) >= len(names):
                return max(acked.values(), default=0.0), acked
            if now > timeout:
                return float("nan"), acked
            time.sleep(POLL_S)

    def close(self) -> None:
        self.channel.close()


class Follower:
    """StreamEvents on one node: timestamps of received `file` events."""

    def __init__(self, fleet: Fleet, node: str) -> None:
        self.times: queue.Queue[float] = queue.Queue()
        req = fleet.pb.StreamEventsRequest(nodes=[node], event_sets=["file"], sample_rate=1.0)
        self.call = fleet.stub.StreamEvents(req)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            for msg in self.call:
                if msg.HasField("event"):
                    self.times.put(time.monotonic())

    def first_after(self, t0: float, timeout: float) -> float:
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return float("nan")
            try:
                t = self.times.get(timeout=left)
            except queue.Empty:
                return float("nan")
            if t >= t0:
                return t - t0

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.times.get_nowait()

    def close(self) -> None:
        self.call.cancel()


def _rounds(fleet: Fleet, selector: str, expect: int, rounds: int, follow: str,
            ctl_pid: int) -> dict[str, Any]:  # fmt: skip
    follower = Follower(fleet, follow)
    time.sleep(1.0)
    all_acked: list[float] = []
    per_node: list[float] = []
    first_event: list[float] = []
    disable_acked: list[float] = []
    timeout = 60.0
    s0 = proc_sample(ctl_pid)
    fleet.call_s.clear()
    try:
        for r in range(rounds):
            gen, matched, t0 = fleet.configure(selector, True)
            if len(matched) != expect:
                raise RuntimeError(f"enable matched {len(matched)} nodes, expected {expect}")
            done, acked = fleet.wait_acked(selector, gen, set(matched), t0, timeout)
            first = follower.first_after(t0, 10.0)
            all_acked.append(done)
            per_node += list(acked.values())
            first_event.append(first)
            gen, _, t1 = fleet.configure(selector, False)
            off, _ = fleet.wait_acked(selector, gen, set(matched), t1, timeout)
            disable_acked.append(off)
            log(f"control:   round {r + 1}/{rounds}: all acked {done * 1e3:.0f} ms, first "
                f"event {first * 1e3:.0f} ms, disable acked {off * 1e3:.0f} ms")  # fmt: skip
            time.sleep(0.5)
            follower.drain()
    finally:
        follower.close()
    s1 = proc_sample(ctl_pid)
    ok = [x for x in all_acked if x == x]
    return {
        "agents": expect,
        "rounds": rounds,
        "enable_to_all_acked_ms": summary([x * 1e3 for x in ok]),
        "enable_to_all_acked_p99_ms": percentile([x * 1e3 for x in ok], 99),
        "enable_to_node_acked_ms": summary([x * 1e3 for x in per_node]),
        "enable_to_node_acked_p99_ms": percentile([x * 1e3 for x in per_node], 99),
        "enable_to_first_event_ms": summary([x * 1e3 for x in first_event if x == x]),
        "first_event_missing": sum(1 for x in first_event if x != x),
        "not_converged": len(all_acked) - len(ok),
        "disable_to_all_acked_ms": summary([x * 1e3 for x in disable_acked if x == x]),
        "status_poll_ms": POLL_S * 1e3,
        "status_call_ms": summary([x * 1e3 for x in fleet.call_s]),
        "controller_cpu_percent_during_rounds": cpu_percent(s0, s1),
        "controller_rss_kb": s1.rss_kb,
        "controller_hwm_kb": s1.hwm_kb,
    }


def measure(quick: bool, tmp: Path) -> dict[str, Any]:
    rounds = 2 if quick else 10
    sims = (50,) if quick else (100, 1000)
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    out: dict[str, Any] = {"controller": addr, "fleets": {}}
    ctl_cmd = [PY, "-m", "tracefleet.controller.server", "--listen", addr, "--insecure-listen",
               "--db", ":memory:",
               "--stale-after", "30", "--window", "5", "--log-level", "WARNING"]  # fmt: skip
    ctl_log = tmp / "controller.log"
    with _proc([*ctl_cmd], ctl_log) as ctl:
        fleet = Fleet(addr)
        try:
            t0 = time.monotonic()
            while True:
                try:
                    fleet.nodes()
                    break
                except Exception:
                    if ctl.poll() is not None or time.monotonic() - t0 > 30:
                        raise RuntimeError("controller did not start: "
                                           + ctl_log.read_text()[-500:]) from None  # fmt: skip
                    time.sleep(0.1)
            s_idle = proc_sample(ctl.pid)
            out["controller_rss_kb_empty"] = s_idle.rss_kb
            # 1 real agent (BPF), with a paced openat source so enabled capture has events
            log("control: 1 real agent")
            real_cmd = [*AGENT_CLI, "run", "--controller", addr, "--node", "bench-real",
                        "--labels", "bench=real", "--hold-seconds", "5"]  # fmt: skip
            src = [str(LOOP), "rate", "/dev/shm/tf-bench-missing/ctl", "3600", "2000"]
            with _proc(real_cmd, tmp / "agent-real.log") as agent, _proc(src, tmp / "src.log"):
                fleet.wait_connected("bench=real", 1, 60)
                res = _rounds(fleet, "bench=real", 1, rounds, "bench-real", ctl.pid)
                a = proc_sample(agent.pid)
                res["agent_rss_kb"] = a.rss_kb
                out["fleets"]["1 real agent"] = res
            for n in sims:
                log(f"control: {n} simulated agents")
                sim_cmd = [PY, "-m", "tracefleet.agent._internal.loadgen", "--controller", addr,
                           "--agents", str(n), "--name", f"sim{n}", "--labels", f"bench=sim{n}",
                           "--rate", "50", "--ramp", str(min(10.0, n / 200))]  # fmt: skip
                with _proc(sim_cmd, tmp / f"loadgen-{n}.log") as lg:
                    took = fleet.wait_connected(f"bench=sim{n}", n, 180)
                    log(f"control:   {n} connected in {took:.1f}s")
                    time.sleep(1.0 if quick else 2.0)
                    c0, l0 = proc_sample(ctl.pid), proc_sample(lg.pid)
                    time.sleep(2.0 if quick else 5.0)
                    c1, l1 = proc_sample(ctl.pid), proc_sample(lg.pid)
                    res = _rounds(fleet, f"bench=sim{n}", n, rounds, f"sim{n}-0000", ctl.pid)
                    res["connect_all_s"] = took
                    res["controller_cpu_percent_steady"] = cpu_percent(c0, c1)
                    res["controller_rss_kb_steady"] = c1.rss_kb
                    res["loadgen_cpu_percent_steady"] = cpu_percent(l0, l1)
                    out["fleets"][f"{n} simulated agents"] = res
                time.sleep(1.0)
        finally:
            fleet.close()
    return out
