"""Section 4, replicated mode: a real 3-member etcd cluster on loopback, two controller
replicas on it (A on member 0, B on member 1: a change crosses etcd's replication too), and N
simulated agents given both addresses (each dials first the replica its name hashes to, so
the fleet splits). Then:

* rounds: ConfigureEventSet(file, enabled) through A, and the WatchAcks streams of both
  replicas (each knows the acknowledgements of its own agents; B's agents get the change
  through etcd's watch) until every agent applied it; then disable the same way;
* failover: with file enabled (batches flowing), A is SIGKILLed and a new generation is made
  through B (net enabled); failover time = from the kill until every agent A had is
  connected to B (reconnect) and applied that generation (acked);
* exact counts: everything disabled through B, and once every agent's outbox is
  acknowledged, the events each agent invented (the load generators' --stats-file) must equal
  what B counts for it (delivered + dropped + discarded): the batches A committed are in the
  ledger in etcd, those it had not acknowledged are resent, none is counted twice.

TRACEFLEET_BENCH_REPLICATED=N sets the fleet of a full run (default 1,000; quick: 50; 0: the
replicated mode is not run)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from tests.bench.common import PY, log, percentile, proc_sample, summary
from tests.bench.control import (
    INTERVAL,
    NOFILE,
    Fleet,
    _check_alive,
    _pinning,
    _proc,
    _raise_nofile,
    change_cpu,
    cpu_now,
    cpu_window,
    loadgen_split,
)
from tests.conftest import LOADGEN
from tests.etcd_cluster import etcd_cluster
from tests.ports import free_port
from tracefleet.agent.control.client import first_controller

ROUND_TIMEOUT = 60.0  # as the single-controller fleets: 60x the 1,000-agent goal


class _Acks:
    """The WatchAcks streams of several replicas for one generation, merged: per node, the
    first time a replica reported it connected (pending or applied) and applied."""

    def __init__(self, fleets: dict[str, Fleet], gen: int, names: list[str], t0: float,
                 timeout: float) -> None:  # fmt: skip
        self.names = frozenset(names)
        self.t0 = t0
        self.seen: dict[str, float] = {}
        self.acked: dict[str, tuple[float, str]] = {}  # node -> (s after t0, replica)
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._calls: list[Any] = []
        self._deadline = time.monotonic() + timeout
        self._threads = [
            threading.Thread(target=self._follow, args=(label, f, gen), daemon=True)
            for label, f in fleets.items()
        ]
        for t in self._threads:
            t.start()

    def _follow(self, label: str, fleet: Fleet, gen: int) -> None:
        pb = fleet.pb
        live = (pb.ACK_STATE_PENDING, pb.ACK_STATE_APPLIED)
        req = pb.WatchAcksRequest(generation=gen, nodes=sorted(self.names))
        while not self.done.is_set() and (left := self._deadline - time.monotonic()) > 0:
            call = fleet.stub.WatchAcks(req, timeout=left)
            with self._lock:
                self._calls.append(call)
            try:
                for msg in call:
                    now = time.monotonic() - self.t0
                    with self._lock:
                        for n in msg.nodes:
                            if n.state in live:
                                self.seen.setdefault(n.name, now)
                            if n.state == pb.ACK_STATE_APPLIED and n.name not in self.acked:
                                self.acked[n.name] = (now, label)
                        if len(self.acked) >= len(self.names):
                            self.done.set()
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return
                # INVALID_ARGUMENT: this replica has not taken the generation from etcd yet;
                # UNAVAILABLE: a replica killed (the failover)
                time.sleep(0.005 if code == grpc.StatusCode.INVALID_ARGUMENT else 0.2)

    def wait(self) -> bool:
        ok = self.done.wait(max(0.0, self._deadline - time.monotonic()))
        self.done.set()
        with self._lock:
            for c in self._calls:
                c.cancel()
        for t in self._threads:
            t.join(timeout=5)
        return ok

    def all_acked_s(self, names: list[str] | None = None) -> float:
        """Seconds from t0 until every node of ``names`` (default: all) applied; NaN if not."""
        want = self.names if names is None else names
        if not all(n in self.acked for n in want):
            return float("nan")
        return max((self.acked[n][0] for n in want), default=0.0)


def _connected(fleet: Fleet, selector: str) -> set[str]:
    conn = fleet.pb.NODE_STATE_CONNECTED
    return {n.name for n in fleet.nodes(selector) if n.state == conn}


def _wait_connected(fleets: list[Fleet], selector: str, n: int, timeout: float,
                    check: Any) -> float:  # fmt: skip
    """Seconds until ``n`` agents are connected, summed over the replicas."""
    t0 = time.monotonic()
    got = 0
    while time.monotonic() - t0 < timeout:
        check()
        got = sum(len(_connected(f, selector)) for f in fleets)
        if got >= n:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise RuntimeError(f"only {got}/{n} agents connected to the replicas after {timeout:.0f}s")


def _stats(files: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in files:
        with contextlib.suppress(OSError, ValueError):
            out += json.loads(f.read_text())
    return out


def _exact(fleet: Fleet, selector: str, files: list[Path], n: int,
           timeout: float) -> dict[str, Any]:  # fmt: skip
    """Once every agent's outbox is acknowledged: per agent, events invented (the load
    generators' stats) against what the replica counts for it."""
    t0 = time.monotonic()
    stats: list[dict[str, Any]] = []
    while time.monotonic() - t0 < timeout:
        stats = _stats(files)
        if len(stats) == n and all(s["unacked"] == 0 and s["connected"] for s in stats):
            break
        time.sleep(0.5)
    else:
        left = sum(1 for s in stats if s["unacked"])
        raise RuntimeError(f"{left} of {len(stats)}/{n} agents still have unacknowledged "
                           f"batches after {timeout:.0f}s")  # fmt: skip
    counted: dict[str, int] = {}
    dup = 0
    for node in fleet.nodes(selector):
        counted[node.name] = sum(t.delivered + t.dropped + t.discarded for t in node.totals)
        dup += node.batches_duplicate
    wrong = []
    for s in stats:
        made = sum(s["produced"].values())
        if counted.get(s["node"]) != made:
            wrong.append(f"{s['node']}: invented {made}, counted {counted.get(s['node'])}")
    return {
        "agents": len(stats),
        "events_invented": sum(sum(s["produced"].values()) for s in stats),
        "events_counted": sum(counted.values()),
        "agents_not_exact": len(wrong),
        "not_exact_examples": wrong[:5],
        "batches_resent": sum(s["batches_resent"] for s in stats),
        "batches_duplicate_ignored": dup,
        "events_discarded": sum(s["events_discarded"] for s in stats),
        "exact": not wrong,
    }


def measure(quick: bool, tmp: Path) -> dict[str, Any]:
    n = 50 if quick else int(os.environ.get("TRACEFLEET_BENCH_REPLICATED", "1000"))
    rounds = 2 if quick else int(os.environ.get("TRACEFLEET_BENCH_ROUNDS", "10"))
    ctl_pin, lg_pin, pinning = _pinning()
    _raise_nofile(NOFILE)
    sel = f"bench=rep{n}"
    out: dict[str, Any] = {"agents": n, "pinning": f"{pinning}; etcd not pinned",
                           "batch_interval_s": INTERVAL}  # fmt: skip
    log(f"control: replicated mode: 3 etcd members, 2 controller replicas, {n} simulated agents")
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(etcd_cluster(tmp / "etcd"))
        urls = etcd.urls
        addrs = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        ctls = [
            stack.enter_context(_proc(
                [*ctl_pin, PY, "-m", "tracefleet.controller.server", "--listen", addr,
                 "--insecure-listen", "--db", ":memory:", "--etcd", url,
                 "--etcd-prefix", f"/bench-{os.getpid()}", "--max-nodes", str(2 * n + 10),
                 "--stale-after", "30", "--window", "5", "--log-level", "WARNING"],
                tmp / f"replica-{label}.log"))
            for label, addr, url in zip("AB", addrs, urls[:2], strict=True)
        ]  # fmt: skip
        fleets = {label: Fleet(addr) for label, addr in zip("AB", addrs, strict=True)}
        for f in fleets.values():
            stack.callback(f.close)
        t0 = time.monotonic()
        for label, f in fleets.items():
            while True:
                try:
                    f.nodes()
                    break
                except grpc.RpcError:
                    if time.monotonic() - t0 > 60:
                        log_text = (tmp / f"replica-{label}.log").read_text()[-500:]
                        raise RuntimeError(f"replica {label} did not start: {log_text}") from None
                    time.sleep(0.1)
        counts = loadgen_split(n)
        procs = len(counts)
        names = [f"rep{n}p{i}-{j:04d}" for i, c in enumerate(counts) for j in range(c)]
        lg_logs = [tmp / f"loadgen-rep{n}-{i}.log" for i in range(procs)]
        stats_files = [tmp / f"loadgen-rep{n}-{i}.json" for i in range(procs)]
        lgs = [
            stack.enter_context(_proc(
                [*lg_pin, PY, str(LOADGEN), "--controller", ",".join(addrs),
                 "--agents", str(c), "--name", f"rep{n}p{i}", "--labels", sel,
                 "--rate", "50", "--interval", str(INTERVAL), "--ramp", str(min(30.0, n / 200)),
                 "--stats-file", str(stats_files[i])],
                lg_logs[i]))
            for i, c in enumerate(counts)
        ]  # fmt: skip
        alive = functools.partial(_check_alive, lgs, lg_logs)
        took = _wait_connected(list(fleets.values()), sel, n, 120 + n / 20, alive)
        on_a = sorted(_connected(fleets["A"], sel))
        expect_a = sorted(x for x in names if first_controller(x, 2) == 0)
        out |= {"connect_all_s": took, "agents_on_a": len(on_a), "agents_on_b": n - len(on_a)}
        log(f"control:   {n} connected in {took:.1f}s ({len(on_a)} on A, {n - len(on_a)} on B)")
        if on_a != expect_a:
            raise RuntimeError(f"{len(on_a)} agents on replica A, {len(expect_a)} expected by "
                               "their names' hash")  # fmt: skip
        time.sleep(1.0 if quick else 2.0)
        out |= _rounds(fleets, sel, names, on_a, rounds,
                       {"replica A": ctls[0].pid, "replica B": ctls[1].pid,
                        **{f"etcd member {i}": p for i, p in enumerate(etcd.pids)},
                        **{f"load generator {i}": p.pid for i, p in enumerate(lgs)}})  # fmt: skip
        out["replica_rss_kb"] = [proc_sample(c.pid).rss_kb for c in ctls]
        out["failover"] = _failover(fleets, ctls[0], sel, names, on_a, alive)
        b = fleets["B"]
        for event_set in ("file", "net"):
            gen, _, t1 = b.configure(sel, False, event_set)
            w = _Acks({"B": b}, gen, names, t1, ROUND_TIMEOUT)
            if not w.wait():
                raise RuntimeError(f"disable {event_set} through B: {len(w.acked)}/{n} acked")
        out["counts"] = _exact(b, sel, stats_files, n, 60.0)
        log(f"control:   counts after the failover: {out['counts']['agents_not_exact']} of "
            f"{n} agents not exact, {out['counts']['batches_resent']} batches resent, "
            f"{out['counts']['batches_duplicate_ignored']} ignored as duplicates")  # fmt: skip
    return out


def _rounds(fleets: dict[str, Fleet], sel: str, names: list[str], on_a: list[str],
            rounds: int, pids: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """Enable through A, acks from both replicas; then disable the same way."""
    a = fleets["A"]
    merged = {f"replica {k}": f for k, f in fleets.items()}
    on_b = sorted(set(names) - set(on_a))
    all_acked: list[float] = []
    own: list[float] = []  # A's agents
    other: list[float] = []  # B's agents: the change went through etcd
    per_node: list[float] = []
    disable: list[float] = []
    windows: list[tuple[float, dict[str, float]]] = []
    load0 = os.getloadavg()[0]
    for r in range(rounds):
        w0 = cpu_now(pids)
        gen, _, t0 = a.configure(sel, True)
        w = _Acks(merged, gen, names, t0, ROUND_TIMEOUT)
        w.wait()
        windows.append(cpu_window(w0, cpu_now(pids)))
        done = w.all_acked_s()
        all_acked.append(done)
        own.append(w.all_acked_s(on_a))
        other.append(w.all_acked_s(on_b))
        per_node += [t for t, _ in w.acked.values()]
        gen, _, t1 = a.configure(sel, False)
        d = _Acks(merged, gen, names, t1, ROUND_TIMEOUT)
        d.wait()
        disable.append(d.all_acked_s())
        log(f"control:   replicated round {r + 1}/{rounds}: all acked {done * 1e3:.0f} ms "
            f"(A's agents {own[-1] * 1e3:.0f}, B's {other[-1] * 1e3:.0f}), disable acked "
            f"{disable[-1] * 1e3:.0f} ms")  # fmt: skip
        if done != done:
            log(f"control:   not converged in {ROUND_TIMEOUT:.0f} s ({len(w.acked)}/"
                f"{len(names)} acked); the other rounds are not run")  # fmt: skip
            break
        time.sleep(0.5)
    ok = [x * 1e3 for x in all_acked if x == x]
    return {
        "rounds": len(all_acked),
        "not_converged": len(all_acked) - len(ok),
        "enable_to_all_acked_ms": summary(ok),
        "enable_to_all_acked_p99_ms": percentile(ok, 99),
        "enable_to_all_acked_own_replica_ms": summary([x * 1e3 for x in own if x == x]),
        "enable_to_all_acked_other_replica_ms": summary([x * 1e3 for x in other if x == x]),
        "enable_to_node_acked_p99_ms": percentile([x * 1e3 for x in per_node], 99),
        "disable_to_all_acked_ms": summary([x * 1e3 for x in disable if x == x]),
        **change_cpu(windows, len(names), max(load0, os.getloadavg()[0])),
        "loadavg_1m": [load0, os.getloadavg()[0]],
    }


def _failover(fleets: dict[str, Fleet], ctl_a: Any, sel: str, names: list[str],
              on_a: list[str], alive: Any) -> dict[str, Any]:  # fmt: skip
    """SIGKILL replica A with file enabled everywhere; a new generation through B."""
    a, b = fleets["A"], fleets["B"]
    gen, _, t0 = a.configure(sel, True)
    w = _Acks({"replica A": a, "replica B": b}, gen, names, t0, ROUND_TIMEOUT)
    if not w.wait():
        raise RuntimeError(f"before the failover: {len(w.acked)}/{len(names)} acked")
    time.sleep(3.0)  # batches flow; A holds its BatchAcks back up to 2 s: some unacknowledged
    alive()
    # A's agents now, not at the start: a stream broken since (a stalled load generator's
    # keepalive) moved its agent to the other replica, and its move is not this failover's
    on_kill = sorted(_connected(a, sel))
    ctl_a.send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    ctl_a.wait()
    gen2, _, _ = b.configure(sel, True, "net")
    timeout = 120.0
    f = _Acks({"replica B": b}, gen2, names, t_kill, timeout)
    f.wait()
    reconnect = [f.seen.get(x, float("nan")) for x in on_kill]
    acked = f.all_acked_s(on_kill)
    res = {
        "agents_moved": len(on_kill),
        "agents_left_a_before_the_kill": len(set(on_a) - set(on_kill)),
        "reconnect_all_s": max(reconnect) if all(x == x for x in reconnect) else float("nan"),
        "reconnect_median_s": statistics.median(reconnect) if reconnect else float("nan"),
        "failover_s": acked,
        "acked_new_generation": sum(1 for x in on_kill if x in f.acked),
        "all_acked_new_generation_s": f.all_acked_s(),
        "timeout_s": timeout,
    }
    log(f"control:   failover: {len(on_kill)} agents of A on B in {res['reconnect_all_s']:.2f}s, "
        f"acked the new generation in {acked:.2f}s after A's SIGKILL")  # fmt: skip
    return res
