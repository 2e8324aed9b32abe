"""Section 3: delivery. A paced openat loop (missing path, ENOENT) on one CPU with the `file`
set on (comm filter), the agent's consumer (BpfEngine in this process, decoding every record)
on the other; per ring/poll configuration, a sweep of offered rates: kernel EVENTS (records
written) vs DROPPED (ring full) from kernel_counters(), events decoded by the agent."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from tests.bench.common import LOOP_COMM, cpus, log, pinned, run_loop, self_cpu_s


@dataclass(frozen=True)
class Config:
    name: str
    ring_bytes: int
    wakeup_bytes: int
    poll_ms: int


DEFAULT = Config("default: ring 8 MiB, wakeup at 1 MiB, poll 20 ms", 8 << 20, 1 << 20, 20)
CONFIGS = (
    DEFAULT,
    Config("ring 64 MiB, wakeup at 1 MiB, poll 20 ms", 64 << 20, 1 << 20, 20),
    Config("ring 8 MiB, wakeup at 64 KiB, poll 5 ms", 8 << 20, 64 << 10, 5),
    Config("ring 8 MiB, wakeup every event", 8 << 20, 0, 20),
)
RATES = (10_000, 20_000, 40_000, 60_000, 80_000, 120_000, 160_000, 240_000)
MISSING = "/dev/shm/tf-bench-missing/x"
SUSTAIN_DRAIN = 0.25


class _Count:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, ev: dict[str, Any]) -> None:
        self.n += 1


def _one(engine: Any, counter: _Count, rate: float, seconds: float, loop_cpu: int
         ) -> dict[str, Any]:  # fmt: skip
    k0 = engine.kernel_counters("file")
    c0 = counter.n
    cpu0 = self_cpu_s()
    t0 = time.monotonic()
    res = run_loop("rate", MISSING, seconds, loop_cpu, rate=rate)
    loop_s = res["ns"] / 1e9
    # drain: the consumer keeps decoding what the ring still holds
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        k = engine.kernel_counters("file")
        if counter.n - c0 >= k["events"] - k0["events"]:
            break
        time.sleep(0.01)
    total_s = time.monotonic() - t0
    cpu = self_cpu_s() - cpu0
    k1 = engine.kernel_counters("file")
    written = k1["events"] - k0["events"]
    dropped = k1["dropped"] - k0["dropped"]
    decoded = counter.n - c0
    attempted = written + dropped
    return {
        "offered_rate": rate or None,
        "achieved_rate": res["iters"] / loop_s,
        "loop_cpu_share": res["cpu_ns"] / res["ns"],  # < 1: paced, or starved by neighbours
        "iterations": res["iters"],
        "kernel_written": written,
        "kernel_dropped": dropped,
        "decoded": decoded,
        "drop_share": dropped / attempted if attempted else 0.0,
        "accounted": attempted >= res["iters"] and decoded == written,
        "delivered_per_s": decoded / loop_s,
        "decode_per_s": decoded / total_s,
        "drain_s": total_s - loop_s,
        "agent_cpu_percent": 100.0 * cpu / total_s,  # the whole bench process (consumer)
    }


def measure(quick: bool) -> dict[str, Any]:
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.capture.engine import EventSetConfig, Filters

    tracer_cpu, loop_cpu = cpus()
    seconds = 0.5 if quick else 2.0
    configs = CONFIGS[:1] if quick else CONFIGS
    rates = (20_000, 80_000) if quick else RATES
    out: dict[str, Any] = {"seconds_per_point": seconds, "configs": []}
    for cfg in configs:
        log(f"delivery: {cfg.name}")
        counter = _Count()
        with pinned({tracer_cpu}):
            engine = BpfEngine(EngineOptions(ring_bytes=cfg.ring_bytes,
                                             wakeup_bytes=cfg.wakeup_bytes,
                                             poll_ms=cfg.poll_ms, hold_seconds=3600))  # fmt: skip
            engine.add_sink(counter)
            engine.apply({"file": EventSetConfig("file", True, Filters(comms=(LOOP_COMM,)))})
            engine.start()
        points = []
        try:
            with pinned({tracer_cpu}):
                drops_seen = 0
                for rate in rates:
                    p = _one(engine, counter, rate, seconds, loop_cpu)
                    points.append(p)
                    log(f"delivery:   {rate}/s -> {p['achieved_rate']:.0f}/s, dropped "
                        f"{p['drop_share']:.1%}, decoded {p['decode_per_s']:.0f}/s")  # fmt: skip
                    drops_seen += p["kernel_dropped"] > 0
                    if drops_seen >= 2:
                        break
                p = _one(engine, counter, 0, seconds, loop_cpu)  # unpaced: as fast as possible
                points.append(p)
                log(f"delivery:   max -> {p['achieved_rate']:.0f}/s, dropped "
                    f"{p['drop_share']:.1%}, decoded {p['decode_per_s']:.0f}/s")  # fmt: skip
        finally:
            engine.close()
        clean = [p for p in points if p["kernel_dropped"] == 0 and p["accounted"]]
        best = max(clean, key=lambda p: p["achieved_rate"], default=None)
        # sustained: no drop AND the consumer kept pace (the ring did not merely absorb the
        # burst: what was left to decode after the loop stopped took < 1/4 of its duration)
        kept = [p for p in clean if p["drain_s"] <= SUSTAIN_DRAIN * seconds]
        sustained = max(kept, key=lambda p: p["achieved_rate"], default=None)
        above = [p for p in points if best is None or p["achieved_rate"] > best["achieved_rate"]]
        out["configs"].append({
            "name": cfg.name,
            "ring_bytes": cfg.ring_bytes,
            "wakeup_bytes": cfg.wakeup_bytes,
            "poll_ms": cfg.poll_ms,
            "points": points,
            "max_rate_no_drop": best["achieved_rate"] if best else 0.0,
            "max_rate_sustained": sustained["achieved_rate"] if sustained else 0.0,
            "drop_share_above": [(p["achieved_rate"], p["drop_share"]) for p in above],
            "max_decoded_per_s": max(p["delivered_per_s"] for p in points),
            "all_accounted": all(p["accounted"] for p in points),
        })  # fmt: skip
    from tests.bench import consumer  # compiled vs Python ring consumer

    out["consumer"] = consumer.measure(quick)
    from tests.bench import jsonl  # capture -o jsonl to a file, end to end

    out["jsonl"] = jsonl.measure(quick)
    return out
