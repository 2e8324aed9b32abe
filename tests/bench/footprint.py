"""Section 5: the agent's own footprint. A `tracefleet-agent capture -e file --output jsonl`
process (stdout to /dev/null, so it decodes and serialises every event), sampled from
/proc/PID/stat and /proc/PID/status: idle (set attached, no matching traffic), under a paced
load, and saturated (unpaced loop)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.bench.common import (
    AGENT_CLI,
    LOOP_COMM,
    cpu_percent,
    cpus,
    log,
    proc_sample,
    run_loop,
)

MISSING = "/dev/shm/tf-bench-missing/footprint"


def measure(quick: bool, tmp: Path) -> dict[str, Any]:
    tracer_cpu, loop_cpu = cpus()
    seconds = 1.0 if quick else 5.0
    ready = tmp / "agent.ready"
    errlog = tmp / "agent-footprint.err"
    cmd = ["taskset", "-c", str(tracer_cpu), *AGENT_CLI, "capture", "-e", "file", "--comm",
           LOOP_COMM, "--output", "jsonl", "--ready-file", str(ready)]  # fmt: skip
    out: dict[str, Any] = {"seconds_per_phase": seconds, "phases": {}}
    with open(errlog, "wb") as err, open("/dev/null", "wb") as devnull:
        p = subprocess.Popen(cmd, stdout=devnull, stderr=err)
    try:
        t0 = time.monotonic()
        while not ready.exists():
            if p.poll() is not None or time.monotonic() - t0 > 60:
                raise RuntimeError("agent did not start: " + errlog.read_text()[-500:])
            time.sleep(0.05)
        out["startup_s"] = time.monotonic() - t0
        time.sleep(0.5)
        log("footprint: idle")
        a = proc_sample(p.pid)
        time.sleep(seconds)
        b = proc_sample(p.pid)
        out["phases"]["idle"] = {"cpu_percent": cpu_percent(a, b), "rss_kb": b.rss_kb,
                                 "hwm_kb": b.hwm_kb, "offered_rate": 0}  # fmt: skip
        for name, rate in (("load 10k events/s", 10_000.0), ("saturated (unpaced loop)", 0.0)):
            log(f"footprint: {name}")
            a = proc_sample(p.pid)
            res = run_loop("rate", MISSING, seconds, loop_cpu, rate=rate)
            time.sleep(0.3)
            b = proc_sample(p.pid)
            out["phases"][name] = {
                "cpu_percent": cpu_percent(a, b),
                "rss_kb": b.rss_kb,
                "hwm_kb": b.hwm_kb,
                "offered_rate": res["iters"] / (res["ns"] / 1e9),
            }
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    m = re.search(r"file: events=(\d+) dropped=(\d+)", errlog.read_text(errors="replace"))
    if m:
        out["agent_summary"] = {"events": int(m.group(1)), "dropped": int(m.group(2))}
    return out
