"""Section 4: control plane. A real tracefleet-controller process on loopback; fleets of 1 real
agent (`tracefleet-agent run`, BPF) and N simulated agents (the load generator,
tests/loadgen.py, several processes of at most PER_LOADGEN agents). Per
round: ConfigureEventSet(file, enabled) over gRPC, then the WatchAcks stream of the matched
nodes until every one acked the generation (enable-to-acked, per node and for all; the
controller pushes the acks, nothing is polled), and a StreamEvents follower on one matched
node timestamps the first event (enable-to-first-event); then disable and wait for the acks.
Each fleet reports what limited it: the kind of process (controller, load generators) at 85%
of the CPUs it may use.

TRACEFLEET_BENCH_FLEETS=100,1000,10000 (0: none), TRACEFLEET_BENCH_ROUNDS=N and
TRACEFLEET_BENCH_PER_LOADGEN=N choose the simulated fleets, rounds and agents per load
generator of a full run (for a targeted `tests/bench/run.py --only control`);
TRACEFLEET_BENCH_PIN=1 pins the controller to one CPU and the load generators to the others
(the results say which)."""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import queue
import re
import resource
import shutil
import signal
import statistics
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
from tests.conftest import LOADGEN
from tests.ports import free_port

# simulated agents per load-generator process: TRACEFLEET_BENCH_PER_LOADGEN, else one process
# per CPU the load generators may use, of at most MAX_PER_LOADGEN agents (40 processes of 250
# for 10,000 agents on 2 CPUs spent their CPU starting and switching, load 42)
PER_LOADGEN = int(os.environ.get("TRACEFLEET_BENCH_PER_LOADGEN", "0"))
MAX_PER_LOADGEN = 1000  # as many as the soak runs in one process
# TRACEFLEET_BENCH_PIN=1: the controller on the first CPU this bench may use and the load
# generators on the others (taskset), so that neither takes the other's core; the results
# name the pinning (``pinning``). The bench's own client (ConfigureEventSet, WatchAcks) is
# not pinned.
PIN = os.environ.get("TRACEFLEET_BENCH_PIN", "") not in ("", "0")
LIMIT_CPU = 85.0  # percent of one core: that process was the limit
# with PIN, the CPUs each kind of process may use (the controller replicas share theirs)
PINNED_CPUS = {"controller": 1, "replica A": 1, "replica B": 1,
               "load generator": max(1, len(os.sched_getaffinity(0)) - 1)}  # fmt: skip
# seconds between a simulated agent's batches while a set is on (TRACEFLEET_BENCH_INTERVAL;
# the real agent's default is 1): 10,000 agents at 1 s want ~3 CPUs of controller and as much
# of load generator for their batches alone, beyond a 2-CPU machine
INTERVAL = float(os.environ.get("TRACEFLEET_BENCH_INTERVAL", "1"))
NOFILE = 65536  # the controller holds one socket per agent (10,000 need more than 1,024)


def _raise_nofile(nofile: int) -> None:
    """This process's file limit, which the daemons inherit: as high as allowed (raising the
    hard limit may be refused). Set here, not in a preexec_fn: forking this process (gRPC
    threads running) to run Python before exec once left a load generator dead at start
    (epoll_wait: Bad file descriptor), and 250 agents missing."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, max(nofile, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))


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


_STREAM_ERROR = re.compile(r": controller \S+: ([A-Z_]+ .{0,80})$", re.M)


def _stream_errors(logs: list[Path]) -> str:
    """The simulated agents' stream errors in the load generators' logs, most frequent first
    (what to name when a fleet does not connect)."""
    counts: collections.Counter[str] = collections.Counter()
    for logf in logs:
        with contextlib.suppress(OSError):
            counts.update(_STREAM_ERROR.findall(logf.read_text(errors="replace")))
    if not counts:
        return "the load generators logged no stream error"
    top = "; ".join(f"{n} x {what}" for what, n in counts.most_common(3))
    return f"the load generators' agents logged {sum(counts.values())} stream errors: {top}"


def _check_alive(procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    """A load generator that exited: name it, with the end of its log (not a time-out)."""
    for p, logf in zip(procs, logs, strict=True):
        if p.poll() is not None:
            tail = logf.read_text(errors="replace")[-400:]
            raise RuntimeError(f"load generator {logf.name} exited ({p.returncode}): {tail}")


class Fleet:
    def __init__(self, address: str) -> None:
        import grpc

        from tracefleet.v1 import control_pb2, control_pb2_grpc

        self.pb = control_pb2
        self.channel = grpc.insecure_channel(address)
        self.stub = control_pb2_grpc.ControlServiceStub(self.channel)
        self.call_s: list[float] = []

    def nodes(self, selector: str = "") -> list[Any]:
        c0 = time.monotonic()
        st = self.stub.GetStatus(self.pb.GetStatusRequest(selector=selector), timeout=120)
        self.call_s.append(time.monotonic() - c0)
        return list(st.nodes)

    def wait_connected(self, names: list[str], timeout: float,
                       check: Any = None) -> float:  # fmt: skip
        """Seconds until every node of ``names`` has an open stream (WatchAcks counts);
        ``check()`` (every 5 s) raises if a process that runs them died."""
        t0 = time.monotonic()
        req = self.pb.WatchAcksRequest(nodes=names)
        got = 0
        while time.monotonic() - t0 < timeout:
            if check is not None:
                check()
            call = self.stub.WatchAcks(req, timeout=min(5.0, timeout - (time.monotonic() - t0)))
            with contextlib.suppress(Exception):
                for msg in call:
                    got = msg.applied_count + msg.pending_count
                    if got >= len(names):
                        call.cancel()
                        return time.monotonic() - t0
        raise RuntimeError(f"only {got}/{len(names)} agents connected after {timeout:.0f}s")

    def configure(self, selector: str, enabled: bool,
                  event_set: str = "file") -> tuple[int, list[str], float]:  # fmt: skip
        req = self.pb.ConfigureEventSetRequest(event_set=event_set, enabled=enabled,
                                               selector=selector if enabled else "")  # fmt: skip
        t0 = time.monotonic()
        resp = self.stub.ConfigureEventSet(req, timeout=60)
        return int(resp.generation), list(resp.matched_nodes), t0

    def wait_acked(self, gen: int, names: list[str], t0: float,
                   timeout: float) -> tuple[float, dict[str, float]]:  # fmt: skip
        """Seconds from t0 until every node of ``names`` applied ``gen`` (NaN if not within
        ``timeout``); per-node times, as the controller pushed them."""
        acked: dict[str, float] = {}
        applied = self.pb.ACK_STATE_APPLIED
        req = self.pb.WatchAcksRequest(generation=gen, nodes=names)
        call = self.stub.WatchAcks(req, timeout=timeout)
        with contextlib.suppress(Exception):
            for msg in call:
                now = time.monotonic() - t0
                for n in msg.nodes:
                    if n.state == applied:
                        acked.setdefault(n.name, now)
                if len(acked) >= len(names):
                    call.cancel()
                    return max(acked.values(), default=0.0), acked
        return float("nan"), acked

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
            ctl_pid: int, lg_pids: tuple[int, ...] = ()) -> dict[str, Any]:  # fmt: skip
    follower = Follower(fleet, follow)
    time.sleep(1.0)
    all_acked: list[float] = []
    per_node: list[float] = []
    first_event: list[float] = []
    disable_acked: list[float] = []
    timeout = 60.0  # 60x the largest fleet's goal: enough to judge, short enough to finish
    s0 = proc_sample(ctl_pid)
    lg0 = [proc_sample(p) for p in lg_pids]
    load0 = os.getloadavg()[0]
    fleet.call_s.clear()
    windows: list[tuple[float, dict[str, float]]] = []  # wall, each process's CPU
    pids = procs_named(ctl_pid, lg_pids)
    try:
        for r in range(rounds):
            w0 = cpu_now(pids)
            gen, matched, t0 = fleet.configure(selector, True)
            if len(matched) != expect:
                raise RuntimeError(f"enable matched {len(matched)} nodes, expected {expect}")
            done, acked = fleet.wait_acked(gen, matched, t0, timeout)
            windows.append(cpu_window(w0, cpu_now(pids)))
            first = follower.first_after(t0, 10.0)
            all_acked.append(done)
            per_node += list(acked.values())
            first_event.append(first)
            gen, _, t1 = fleet.configure(selector, False)
            off, _ = fleet.wait_acked(gen, matched, t1, timeout)
            disable_acked.append(off)
            fleet.nodes(selector)  # the cost of one status call of this fleet
            cpu = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in _by_kind(windows[-1][1]).items())
            log(f"control:   round {r + 1}/{rounds}: all acked {done * 1e3:.0f} ms (CPU ms: "
                f"{cpu}), first event {first * 1e3:.0f} ms, disable acked {off * 1e3:.0f} "
                "ms")  # fmt: skip
            if done != done:  # not converged: the next rounds would wait as long again
                log(f"control:   the fleet did not converge in {timeout:.0f} s; its other "
                    "rounds are not run")  # fmt: skip
                break
            time.sleep(0.5)
            follower.drain()
    finally:
        follower.close()
    s1 = proc_sample(ctl_pid)
    lg1 = [proc_sample(p) for p in lg_pids]
    lg_cpu = [cpu_percent(a, b) for a, b in zip(lg0, lg1, strict=True)]
    ctl_cpu = cpu_percent(s0, s1)
    ok = [x for x in all_acked if x == x]
    return {
        "agents": expect,
        "rounds": len(all_acked),
        "enable_to_all_acked_ms": summary([x * 1e3 for x in ok]),
        "enable_to_all_acked_p99_ms": percentile([x * 1e3 for x in ok], 99),
        "enable_to_node_acked_ms": summary([x * 1e3 for x in per_node]),
        "enable_to_node_acked_p99_ms": percentile([x * 1e3 for x in per_node], 99),
        "enable_to_first_event_ms": summary([x * 1e3 for x in first_event if x == x]),
        "first_event_missing": sum(1 for x in first_event if x != x),
        "not_converged": len(all_acked) - len(ok),
        "disable_to_all_acked_ms": summary([x * 1e3 for x in disable_acked if x == x]),
        "status_call_ms": summary([x * 1e3 for x in fleet.call_s]),
        "controller_cpu_percent_during_rounds": ctl_cpu,
        "loadgen_processes": len(lg_pids),
        "loadgen_cpu_percent_during_rounds_max": max(lg_cpu, default=0.0),
        "limit_rounds": _limit(ctl_cpu, lg_cpu, max(load0, os.getloadavg()[0])),
        **change_cpu(windows, expect, max(load0, os.getloadavg()[0])),
        "loadavg_1m": [load0, os.getloadavg()[0]],
        "controller_rss_kb": s1.rss_kb,
        "controller_hwm_kb": s1.hwm_kb,
    }


def _bare_changes(fleet: Fleet, names: list[str], changes: int, pids: dict[str, int],
                  steady: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """CPU per agent of a change alone: ``changes`` generations that switch a set on and off
    for nodes outside the fleet, which every agent still gets, applies and acks (no batches
    follow, unlike an enable); the steady (idle) CPU of the same time is taken off."""
    w0 = cpu_now(pids)
    walls = []
    for i in range(changes):
        gen, _, t0 = fleet.configure("bench=no-such-node", i % 2 == 0, "exec")
        done, _ = fleet.wait_acked(gen, names, t0, 60.0)
        walls.append(done)
        if done != done:  # not converged: the next ones would wait as long again
            break
    wall, cpu = cpu_window(w0, cpu_now(pids))
    by_kind: dict[str, float] = {}
    for name, c in cpu.items():
        by_kind[_kind(name)] = by_kind.get(_kind(name), 0.0) + c
    return {
        "changes": len(walls),
        "all_acked_ms": summary([x * 1e3 for x in walls if x == x]),
        "not_converged": sum(1 for x in walls if x != x),
        "cpu_us_per_agent_per_change": {
            k: max(0.0, v - steady.get(k, 0.0) * wall) * 1e6 / (len(walls) * len(names))
            for k, v in by_kind.items()
        },
    }


def procs_named(ctl_pid: int, lg_pids: tuple[int, ...]) -> dict[str, int]:
    """The bench's processes by name: "KIND" or "KIND N" (several of a kind)."""
    return {"controller": ctl_pid, **{f"load generator {i}": p for i, p in enumerate(lg_pids)}}


def cpu_now(pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    """(monotonic s, CPU s of each named process)."""
    return time.monotonic(), {name: proc_sample(pid).cpu_s for name, pid in pids.items()}


def cpu_window(
    w0: tuple[float, dict[str, float]], w1: tuple[float, dict[str, float]]
) -> tuple[float, dict[str, float]]:
    """Wall seconds between two cpu_now() readings and each process's CPU seconds in them."""
    return w1[0] - w0[0], {name: w1[1][name] - c for name, c in w0[1].items()}


def _kind(name: str) -> str:
    return name.rstrip("0123456789").rstrip()


def _by_kind(cpu_s: dict[str, float]) -> dict[str, float]:
    """CPU seconds of each kind of process (controller, load generator) in one window."""
    out: dict[str, float] = {}
    for name, v in cpu_s.items():
        out[_kind(name)] = out.get(_kind(name), 0.0) + v
    return out


def change_cpu(windows: list[tuple[float, dict[str, float]]], agents: int,
               load: float) -> dict[str, Any]:  # fmt: skip
    """CPU each kind of process spent from each enable to all acked (the median window), and
    what limited that window: the kind of process that used the largest share of the CPUs it
    may run on (one each, at most the CPUs the bench pins that kind to: ten load generators
    pinned to one CPU share that one), at 85% of them or more; else all the machine's CPUs
    busy with the bench's own processes, or neither (other processes). The whole-rounds
    average hides the burst of a change."""
    cpus = os.cpu_count() or 1
    wall = statistics.median(w for w, _ in windows)
    names = list(windows[0][1])
    kinds = list(dict.fromkeys(_kind(n) for n in names))
    by_kind = {k: statistics.median(_by_kind(c)[k] for _, c in windows) for k in kinds}
    pinned = PINNED_CPUS if _pinning()[0] else {}
    room = {k: min(sum(_kind(n) == k for n in names), pinned.get(k, cpus)) for k in kinds}
    use = {k: by_kind[k] / (room[k] * wall) if wall > 0 else 0.0 for k in kinds}
    total = sum(by_kind.values())
    top = max(kinds, key=lambda k: use[k])
    if use[top] >= LIMIT_CPU / 100:
        limit = (f"{top} ({use[top]:.0%} of its {room[top]} CPU(s) from enable to all "
                 "acked)")  # fmt: skip
    elif total >= LIMIT_CPU / 100 * cpus * wall:
        limit = (f"the machine's {cpus} CPUs ({' and '.join(kinds)} used "
                 f"{total / wall:.1f} of them from enable to all acked)")  # fmt: skip
    elif load > cpus:
        limit = (f"CPU contention (load {load:.1f} on {cpus} CPUs; the bench's processes used "
                 f"{total / wall:.1f} CPUs from enable to all acked)")  # fmt: skip
    else:
        limit = (f"neither at a full core (the bench's processes used {total / wall:.1f} "
                 f"of {cpus} CPUs from enable to all acked)")  # fmt: skip
    out: dict[str, Any] = {
        "limit": limit,
        "change_window_ms": wall * 1e3,
        "change_cpu_ms": {k: v * 1e3 for k, v in by_kind.items()},
        "change_cpu_us_per_agent": {k: v * 1e6 / agents for k, v in by_kind.items()},
    }
    if "controller" in by_kind:  # the single-controller fleets' own keys
        ctl, lgs = by_kind["controller"], by_kind.get("load generator", 0.0)
        out |= {
            "change_controller_cpu_ms": ctl * 1e3,
            "change_loadgen_cpu_ms": lgs * 1e3,
            "change_controller_cpu_us_per_agent": ctl * 1e6 / agents,
            "change_loadgen_cpu_us_per_agent": lgs * 1e6 / agents,
        }
    return out


def _limit(ctl_cpu: float, lg_cpu: list[float], load: float) -> str:
    """Which process ran at a full core during the rounds (the limit), if any; else whether
    the machine had more runnable work than CPUs (every process got a share of a core)."""
    if ctl_cpu >= LIMIT_CPU:
        return "controller"
    if lg_cpu and max(lg_cpu) >= LIMIT_CPU:
        return "load generator"
    cpus = os.cpu_count() or 1
    if load > cpus:
        return f"CPU contention (load {load:.1f} on {cpus} CPUs; no process at a full core)"
    return "neither at a full core"


def _cpu_split() -> tuple[int, list[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[1:]


def loadgen_split(n: int) -> list[int]:
    """Agents of each load-generator process for a fleet of ``n``."""
    lg_cpus = len(_cpu_split()[1]) if _pinning()[1] else os.cpu_count() or 1
    per = PER_LOADGEN or max(1, min(MAX_PER_LOADGEN, math.ceil(n / lg_cpus)))
    procs = math.ceil(n / per)
    return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]


def _pinning() -> tuple[list[str], list[str], str]:
    """taskset prefixes of the controller and of the load generators, and what they do."""
    first, rest = _cpu_split()
    if not PIN:
        return [], [], "none (TRACEFLEET_BENCH_PIN unset: every process on any CPU)"
    if not rest or shutil.which("taskset") is None:
        return [], [], f"none (asked for, but {len(rest) + 1} CPU(s) or no taskset)"
    others = ",".join(str(c) for c in rest)
    return (["taskset", "-c", str(first)], ["taskset", "-c", others],
            f"controller on CPU {first}, load generators on CPU {others} (taskset)")  # fmt: skip


def measure(quick: bool, tmp: Path) -> dict[str, Any]:
    rounds = 2 if quick else int(os.environ.get("TRACEFLEET_BENCH_ROUNDS", "10"))
    env_fleets = os.environ.get("TRACEFLEET_BENCH_FLEETS", "")
    sims = (
        (50,)
        if quick
        else tuple(int(x) for x in env_fleets.split(",") if x and int(x) > 0)
        if env_fleets
        else (100, 1000, 10000)
    )
    port = free_port()
    addr = f"127.0.0.1:{port}"
    ctl_pin, lg_pin, pinning = _pinning()
    out: dict[str, Any] = {"controller": addr, "fleets": {}, "pinning": pinning,
                           "batch_interval_s": INTERVAL}  # fmt: skip
    ctl_cmd = [*ctl_pin, PY, "-m", "tracefleet.controller.server", "--listen", addr,
               "--insecure-listen", "--db", ":memory:", "--max-nodes", str(2 * sum(sims) + 10),
               "--stale-after", "30", "--window", "5", "--log-level", "WARNING"]  # fmt: skip
    ctl_log = tmp / "controller.log"
    _raise_nofile(NOFILE)
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
                fleet.wait_connected(["bench-real"], 60)
                res = _rounds(fleet, "bench=real", 1, rounds, "bench-real", ctl.pid)
                a = proc_sample(agent.pid)
                res["agent_rss_kb"] = a.rss_kb
                out["fleets"]["1 real agent"] = res
            for n in sims:
                counts = loadgen_split(n)
                procs = len(counts)
                log(f"control: {n} simulated agents in {procs} load-generator process(es)")
                # the load generator names a process's only agent by its prefix alone
                names = [f"sim{n}p{i}-{j:04d}" if c > 1 else f"sim{n}p{i}"
                         for i, c in enumerate(counts) for j in range(c)]  # fmt: skip
                lg_logs = [tmp / f"loadgen-{n}-{i}.log" for i in range(procs)]
                with contextlib.ExitStack() as stack:
                    lgs = [
                        stack.enter_context(_proc(
                            [*lg_pin, PY, str(LOADGEN), "--controller",
                             addr, "--agents", str(c), "--name", f"sim{n}p{i}", "--labels",
                             f"bench=sim{n}", "--rate", "50", "--interval", str(INTERVAL), "--ramp",
                             str(min(30.0, n / 200))],
                            lg_logs[i]))
                        for i, c in enumerate(counts)
                    ]  # fmt: skip
                    alive = functools.partial(_check_alive, lgs, lg_logs)
                    try:
                        took = fleet.wait_connected(names, 120 + n / 20, alive)
                    except RuntimeError as e:  # name what the agents saw, and the set-up
                        raise RuntimeError(
                            f"{e} ({procs} load generators of up to {max(counts)} agents on "
                            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}); "
                            f"{_stream_errors(lg_logs)}"
                        ) from None
                    log(f"control:   {n} connected in {took:.1f}s")
                    time.sleep(1.0 if quick else 2.0)
                    pids = tuple(p.pid for p in lgs)
                    c0, l0 = proc_sample(ctl.pid), [proc_sample(p) for p in pids]
                    time.sleep(2.0 if quick else 5.0)
                    c1, l1 = proc_sample(ctl.pid), [proc_sample(p) for p in pids]
                    res = _rounds(fleet, f"bench=sim{n}", n, rounds, names[0], ctl.pid, pids)
                    idle = cpu_percent(c0, c1)
                    res["connect_all_s"] = took
                    res["controller_cpu_percent_steady"] = idle
                    res["controller_rss_kb_steady"] = c1.rss_kb
                    res["controller_rss_kb_before"] = s_idle.rss_kb
                    # per connected agent; RSS over the controller before any agent (earlier
                    # fleets' records stay, so this is an upper bound past the first fleet)
                    res["controller_cpu_percent_per_agent_idle"] = idle / n
                    res["controller_cpu_percent_per_agent_rounds"] = (
                        res["controller_cpu_percent_during_rounds"] / n
                    )
                    res["controller_rss_kb_per_agent"] = (c1.rss_kb - s_idle.rss_kb) / n
                    res["loadgen_cpu_percent_steady_max"] = max(
                        cpu_percent(a, b) for a, b in zip(l0, l1, strict=True)
                    )
                    dt = c1.t - c0.t
                    lg_s = sum(b.cpu_s - a.cpu_s for a, b in zip(l0, l1, strict=True))
                    steady = {"controller": (c1.cpu_s - c0.cpu_s) / dt, "load generator": lg_s / dt}
                    # all load generators together, in % of one CPU: with PIN they share
                    # PINNED_CPUS["load generator"], and an idle fleet near that leaves a change
                    # no room
                    res["loadgen_cpu_percent_steady"] = 100.0 * steady["load generator"]
                    res["bare_change"] = _bare_changes(
                        fleet, names, 2 if quick else 4, procs_named(ctl.pid, pids), steady
                    )
                    out["fleets"][f"{n} simulated agents"] = res
                time.sleep(1.0)
        finally:
            fleet.close()
    return out
