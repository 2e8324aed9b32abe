"""Section 2: correct captures of the cold-page workloads (tests/workloads) per capture
strategy available on this kernel, and by bpftrace (the logic of
tests/workloads/measure_bpftrace.py: str()/buf() at sys_enter, filtered by comm)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.bench.common import WORKLOADS, log, stop
from tests.workloads import measure_bpftrace as bpftrace_probes

MODES = ("openat", "einval", "openat2", "connect", "connect6", "connect_unix", "exec")
CASES: list[tuple[str, list[str]]] = (
    [("cold_rodata", [m]) for m in MODES]
    + [("cold_filemap", []), ("cold_cross", []), ("cold_anon_swap", [])]
    + [("warm", [m]) for m in MODES]
)
QUICK_CASES = {"cold_rodata openat", "cold_rodata einval", "cold_rodata exec", "cold_filemap",
               "cold_anon_swap", "warm openat"}  # fmt: skip
COMMS = ("cold_rodata", "cold_filemap", "cold_cross", "cold_anon_swap", "warm")
HOLD_MS = 100  # lets the user-space fallback read the target before the workload exits

# bpftrace's side of the comparison: the probes tests/workloads/README.md measured with.
BPFTRACE_SCRIPT = bpftrace_probes.SCRIPT

Expect = tuple[str, int, str, str, str, str]  # case, pid, syscall, arg, encoding, expect


def run_cases(n: int, cases: list[tuple[str, list[str]]]) -> tuple[list[Expect], dict[str, str]]:
    """Run every case n times; returns the expected captures and the skipped cases."""
    expected: list[Expect] = []
    skipped: dict[str, str] = {}
    for name, args in cases:
        label = " ".join([name, *args])
        for _ in range(n):
            hold = [] if args == ["exec"] else ["--hold-ms", str(HOLD_MS)]
            p = subprocess.run([str(WORKLOADS / name), *args, *hold], capture_output=True,
                               text=True, timeout=60)  # fmt: skip
            if p.returncode != 0 or not p.stdout.strip():
                skipped[label] = f"exit {p.returncode}: {p.stderr.strip()[-200:]}"
                break
            d = json.loads(p.stdout.strip().splitlines()[0])
            if "skip" in d:
                skipped[label] = str(d["skip"])
                break
            for c in d["calls"]:
                expected.append(
                    (label, int(d["pid"]), c["syscall"], c["arg"], c["encoding"], c["expect"])
                )
    return expected, skipped


def _tf_matches(ev: dict[str, Any], syscall: str, arg: str, enc: str, expect: str) -> bool:
    from tracefleet.agent.capture.decode import decode_open_how, decode_sockaddr

    args = ev.get("args", {})
    if syscall == "execve":
        if arg == "filename":
            return bool(args.get("filename", {}).get("value") == expect)
        i = int(arg[5:-1])  # argv[i]
        argv = args.get("argv", {}).get("value") or []
        return i < len(argv) and argv[i] == expect
    if arg == "pathname":
        return bool(args.get("pathname", {}).get("value") == expect)
    raw = bytes.fromhex(expect)
    if arg == "how":
        return bool(args.get("how", {}).get("value") == decode_open_how(raw))
    if arg == "uservaddr":
        return bool(args.get("addr", {}).get("value") == decode_sockaddr(raw))
    return False


def tally(expected: list[Expect], ok: set[int]) -> dict[str, dict[str, int]]:
    """Per case: correct captures and calls, with per-argument detail."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"ok": 0, "calls": 0})
    for i, (label, _pid, _sc, _arg, _enc, _exp) in enumerate(expected):
        out[label]["calls"] += 1
        out[label]["ok"] += int(i in ok)
    return dict(out)


def measure_tracefleet(strategy_label: str, n: int, cases: list[tuple[str, list[str]]]
                       ) -> dict[str, Any]:  # fmt: skip
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.capture.engine import EventSetConfig
    from tracefleet.agent.kernel.abi import Strategy

    strat = Strategy.from_label(strategy_label)
    sets = ("file", "net", "exec")
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def sink(ev: dict[str, Any]) -> None:
        if ev["comm"] in COMMS or ev["syscall"] == "execve":
            with lock:
                events.append(ev)

    engine = BpfEngine(EngineOptions(strategies=dict.fromkeys(sets, strat), hold_seconds=3600))
    try:
        engine.add_sink(sink)
        st = engine.apply({s: EventSetConfig(s, True) for s in sets})
        errors = {s.name: s.error for s in st if s.name in sets and s.error}
        if errors:
            return {"available": False, "reason": "; ".join(f"{k}: {v}" for k, v in errors.items())}
        used = sorted({s.strategy for s in st if s.name in sets})
        engine.start()
        expected, skipped = run_cases(n, cases)
        time.sleep(0.5)  # let the consumer drain
        engine.drain()
    finally:
        engine.close()
    by_key: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    with lock:
        for ev in events:
            by_key[(int(ev["pid"]), str(ev["syscall"]))].append(ev)
    ok = {
        i
        for i, (_label, pid, sc, arg, enc, exp) in enumerate(expected)
        if any(_tf_matches(ev, sc, arg, enc, exp) for ev in by_key.get((pid, sc), []))
    }
    return {"available": True, "strategy": ",".join(used), "cases": tally(expected, ok),
            "skipped": skipped}  # fmt: skip


def measure_bpftrace(n: int, cases: list[tuple[str, list[str]]], tmp: Path) -> dict[str, Any]:
    out = tmp / "bpftrace-completeness.out"
    env = dict(os.environ, BPFTRACE_STRLEN="200")
    with open(out, "w") as f:
        bt = subprocess.Popen(["bpftrace", "-e", BPFTRACE_SCRIPT], stdout=f,
                              stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "TF-READY" not in out.read_text(errors="replace"):
            if bt.poll() is not None or time.monotonic() > deadline:
                return {"available": False, "reason": out.read_text()[-300:]}
            time.sleep(0.05)
        expected, skipped = run_cases(n, cases)
        time.sleep(0.5)
    finally:
        stop(bt)
    seen: dict[tuple[int, str, str], list[str]] = defaultdict(list)
    for line in out.read_text(errors="replace").splitlines():
        m = re.match(r"TF (\d+) (\S+) (\S+) ([SB]) ?(.*)$", line)
        if m:
            pid, sc, arg, kind, val = m.groups()
            value = bpftrace_probes.decode_buf(val) if kind == "B" else val
            seen[(int(pid), sc, arg)].append(value)
    ok = {
        i
        for i, (_label, pid, sc, arg, _enc, exp) in enumerate(expected)
        if exp in seen.get((pid, sc, arg), [])
    }
    with contextlib.suppress(OSError):
        out.unlink()
    return {"available": True, "strategy": "bpftrace 0.17 (nofault at sys_enter)",
            "cases": tally(expected, ok), "skipped": skipped}  # fmt: skip


def measure(n: int, quick: bool, tmp: Path) -> dict[str, Any]:
    cases = [c for c in CASES if not quick or " ".join([c[0], *c[1]]) in QUICK_CASES]
    if not (WORKLOADS / "cold_rodata").exists():
        return {"skipped": "workloads not built (make workloads)"}
    tools: dict[str, Any] = {}
    labels = ["sleepable", "fentry-sleepable", "exit-retry", "user-fallback", "nofault"]
    if quick:  # time: two engine loads less (bpftrace shows what a nofault read gets)
        labels.remove("user-fallback")
        labels.remove("nofault")
    for label in labels:
        log(f"completeness: tracefleet {label}, {len(cases)} cases x {n}")
        try:
            tools[f"tracefleet {label}"] = measure_tracefleet(label, n, cases)
        except Exception as e:
            tools[f"tracefleet {label}"] = {"available": False, "reason": str(e)[:300]}
    log(f"completeness: bpftrace, {len(cases)} cases x {n}")
    tools["bpftrace"] = measure_bpftrace(n, cases, tmp)
    return {"runs_per_case": n, "hold_ms": HOLD_MS, "tools": tools,
            "cases": [" ".join([c[0], *c[1]]) for c in cases]}  # fmt: skip
