"""Delivery, consumer side: the compiled ring consumer (fastring) against the Python one.

Throughput: the unpaced openat (ENOENT) loop fills a large ring while nobody consumes; then
the consumer drains it on one CPU (this thread, pinned) and we time it: records/s the
consumer handles, independent of how fast one producer core can make syscalls. Per mode:
aggregate-only (no sink) and decoded into a counting sink. CPU: the paced loop at 10k
calls/s with the consumer thread running aggregate-only, the process's CPU over the run.
"decoded into a sink" with the compiled consumer uses the compiled decode (cdecode: a batch
decoded in C into decode.py's dicts); "decoded, Python decode" is the compiled consumer with
the Python decode (TRACEFLEET_DECODE=off), the decode's own share within the same run."""

from __future__ import annotations

import time
from typing import Any

from tests.bench.common import LOOP_COMM, cpus, log, pinned, run_loop, self_cpu_s

MISSING = "/dev/shm/tf-bench-missing/x"
RING = 128 << 20  # ~150k records of ~850 bytes
DECODED, PYDECODE = "decoded into a sink", "decoded, Python decode"
MODES = (
    ("compiled", "aggregate-only"),
    ("python", "aggregate-only"),
    ("compiled", DECODED),
    ("compiled", PYDECODE),
    ("python", DECODED),
)


def _engine(compiled: bool, ring: int, wakeup: int, decode: bool = True) -> Any:
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.capture.engine import EventSetConfig, Filters

    eng = BpfEngine(EngineOptions(ring_bytes=ring, wakeup_bytes=wakeup, hold_seconds=3600,
                                  sets=("file",), compiled_consumer=compiled,
                                  compiled_decode=decode))  # fmt: skip
    eng.apply({"file": EventSetConfig("file", True, Filters(comms=(LOOP_COMM,)))})
    if eng.consumer()[0] != compiled:
        raise RuntimeError(f"compiled consumer unavailable: {eng.consumer()[1]}")
    if compiled and decode and not eng.decode()[0]:
        raise RuntimeError(f"compiled decode unavailable: {eng.decode()[1]}")
    return eng


def _drain_rate(compiled: bool, sink: bool, seconds: float, tracer: int, loop: int,
                decode: bool = True) -> dict[str, Any]:  # fmt: skip
    n = [0]

    def count(ev: dict[str, Any]) -> None:
        n[0] += 1

    with pinned({tracer}):
        eng = _engine(compiled, RING, 1 << 30, decode)
        try:
            if sink:
                eng.add_sink(count)
            k0 = eng.kernel_counters("file")
            run_loop("rate", MISSING, seconds, loop)  # fills the ring; nobody consumes
            k1 = eng.kernel_counters("file")
            written = k1["events"] - k0["events"]
            t0, c0 = time.perf_counter(), time.thread_time()
            while eng.drain():
                pass
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            delivered = eng.totals()["file"].delivered
            # another loop of the same comm (a shared machine) may write during the drain
            k2 = eng.kernel_counters("file")
            decoded_in_c = eng.decode_counts()
        finally:
            eng.close()
    return {
        "consumer": "compiled" if compiled else "python",
        "mode": (DECODED if decode else PYDECODE) if sink else "aggregate-only",
        "compiled_decode": decoded_in_c,
        "written": written,
        "dropped": k1["dropped"] - k0["dropped"],
        "delivered": delivered,
        "decoded": n[0],
        "drain_s": wall,
        "drain_cpu_s": cpu,
        "records_per_s": delivered / wall if wall else 0.0,
        "written_by_drain_end": k2["events"] - k0["events"],
        "all_counted": delivered == k2["events"] - k0["events"] and (not sink or n[0] == delivered),
    }


def _cpu_at(compiled: bool, rate: float, seconds: float, tracer: int, loop: int
            ) -> dict[str, Any]:  # fmt: skip
    with pinned({tracer}):
        eng = _engine(compiled, 8 << 20, 1 << 20)  # the agent's defaults
        eng.start()
        try:
            time.sleep(0.5)  # the consumer thread is up and idle
            c0, t0 = self_cpu_s(), time.monotonic()
            k0 = eng.kernel_counters("file")
            res = run_loop("rate", MISSING, seconds, loop, rate=rate)
            k1 = eng.kernel_counters("file")
            deadline = time.monotonic() + 30
            while eng.totals()["file"].delivered < k1["events"] and time.monotonic() < deadline:
                time.sleep(0.01)
            wall, cpu = time.monotonic() - t0, self_cpu_s() - c0
        finally:
            eng.close()
    return {
        "consumer": "compiled" if compiled else "python",
        "offered_rate": rate,
        "achieved_rate": res["iters"] / (res["ns"] / 1e9),
        "written": k1["events"] - k0["events"],
        "dropped": k1["dropped"] - k0["dropped"],
        "agent_cpu_percent": 100.0 * cpu / wall,
    }


def measure(quick: bool) -> dict[str, Any]:
    tracer, loop = cpus()
    seconds = 0.3 if quick else 1.0
    out: dict[str, Any] = {"ring_bytes": RING, "drain": [], "cpu": []}
    for consumer, mode in MODES:
        p = _drain_rate(consumer == "compiled", mode != "aggregate-only", seconds, tracer, loop,
                        decode=mode != PYDECODE)  # fmt: skip
        log(f"consumer: {consumer} {mode}: {p['delivered']} records in {p['drain_s']:.3f} s "
            f"-> {p['records_per_s']:.0f}/s")  # fmt: skip
        out["drain"].append(p)
    for compiled in (True, False):
        p = _cpu_at(compiled, 10_000, 1.0 if quick else 5.0, tracer, loop)
        log(f"consumer: {p['consumer']} aggregate-only at {p['achieved_rate']:.0f}/s: agent "
            f"CPU {p['agent_cpu_percent']:.1f}%")  # fmt: skip
        out["cpu"].append(p)
    return out


def render(r: dict[str, Any]) -> list[str]:
    out = [f"consumer drain of a pre-filled {r['ring_bytes'] >> 20} MiB ring, one CPU:"]
    for p in r["drain"]:
        out.append(f"  {p['consumer']:8} {p['mode']:22} {p['delivered']:>8} records "
                   f"{p['drain_s']:.3f} s -> {p['records_per_s']:>10.0f}/s"
                   f"{'' if p['all_counted'] else '  NOT ALL COUNTED'}")  # fmt: skip
    for p in r["cpu"]:
        cpu = p["agent_cpu_percent"]
        out.append(f"  {p['consumer']:8} aggregate-only at {p['achieved_rate']:.0f}/s: agent "
                   f"CPU {cpu:.1f}% of a core ({p['dropped']} dropped)")  # fmt: skip
    return out


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool, str]]:
    """(target, value, met, note) for the issue's consumer goals."""
    out = []
    by = {(p["consumer"], p["mode"]): p for p in r.get("drain", [])}
    for mode, goal in (("aggregate-only", 1_000_000), ("decoded into a sink", 300_000)):
        p = by.get(("compiled", mode))
        if p is None:
            continue
        py = by.get(("python", mode))
        before = f" (Python consumer {py['records_per_s']:.0f}/s)" if py else ""
        pyd = by.get(("compiled", PYDECODE)) if mode == DECODED else None
        if pyd:
            before += f" (compiled consumer, Python decode {pyd['records_per_s']:.0f}/s)"
        met = p["records_per_s"] >= goal and p["all_counted"]
        note = "" if p["all_counted"] else "records not all counted"
        out.append((f"consumer {mode} >= {goal:,} records/s on one core",
                    f"{p['records_per_s']:.0f}/s{before}", met, note))  # fmt: skip
    for p in r.get("cpu", []):
        if p["consumer"] == "compiled":
            v = p["agent_cpu_percent"]
            out.append(
                (
                    "agent CPU at 10k events/s aggregate-only <= 5% of a core",
                    f"{v:.1f}% at {p['achieved_rate']:.0f}/s",
                    v <= 5.0,
                    "",
                )
            )
    return out
