"""Shared helpers of the benchmark: paths, building the C loop and the empty BPF object,
statistics, /proc sampling, host and tool versions."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"
BENCH_BUILD = BUILD / "bench"
BPF_DIR = BUILD / "bpf"
WORKLOADS = BUILD / "workloads"
HERE = Path(__file__).resolve().parent
LOOP = BENCH_BUILD / "tf_bench_loop"
LOOP_COMM = "tf_bench_loop"
EMPTY_OBJ = BENCH_BUILD / "empty.bpf.o"
PY = sys.executable
AGENT_CLI = [PY, "-m", "tracefleet.agent.cli"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- build -----------------------------------------------------------------------------------


def _stale(out: Path, *srcs: Path) -> bool:
    return not out.exists() or any(s.stat().st_mtime > out.stat().st_mtime for s in srcs)


def build() -> None:
    """Compile the C loop and the empty BPF object into build/bench/ (when out of date)."""
    BENCH_BUILD.mkdir(parents=True, exist_ok=True)
    src = HERE / "loop.c"
    if _stale(LOOP, src):
        subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(LOOP), str(src)], check=True)
    esrc = HERE / "empty.bpf.c"
    vmlinux = BUILD / "vmlinux.h"
    if _stale(EMPTY_OBJ, esrc, vmlinux):
        arch = {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        subprocess.run(
            [
                os.environ.get("CLANG", "clang"), "-g", "-O2", "-target", "bpf",
                f"-D__TARGET_ARCH_{arch}", f"-I{BUILD}", f"-I{ROOT / 'bpf' / 'include'}",
                "-c", str(esrc), "-o", str(EMPTY_OBJ),
            ],
            check=True,
        )  # fmt: skip


# ---- statistics ------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated measurements."""
    v = sorted(values)
    if not v:
        return {"n": 0, "median": 0.0, "min": 0.0, "max": 0.0, "q1": 0.0, "q3": 0.0}
    if len(v) >= 4:
        q1, _, q3 = statistics.quantiles(v, n=4)
    else:
        q1, q3 = v[0], v[-1]
    return {
        "n": len(v),
        "median": statistics.median(v),
        "min": v[0],
        "max": v[-1],
        "q1": q1,
        "q3": q3,
    }


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); 0 for no values."""
    v = sorted(values)
    if not v:
        return 0.0
    k = max(0, min(len(v) - 1, round(p / 100 * len(v) + 0.5) - 1))
    return v[k]


# ---- processes -------------------------------------------------------------------------------


@dataclass
class ProcSample:
    t: float  # monotonic seconds
    cpu_s: float  # utime + stime, seconds (all threads)
    rss_kb: int
    hwm_kb: int


def proc_sample(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return ProcSample(time.monotonic(), cpu, rss, hwm)


def cpu_percent(a: ProcSample, b: ProcSample) -> float:
    """CPU use between two samples, percent of one core."""
    dt = b.t - a.t
    return 100.0 * (b.cpu_s - a.cpu_s) / dt if dt > 0 else 0.0


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """Run the calling process (and threads it starts) on ``cpus`` for the block."""
    old = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


@functools.cache
def cpus() -> tuple[int, int]:
    """(cpu for the agent/tracer, cpu for the measured loop), from the affinity at the first
    call (run.py calls it before pinning anything)."""
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) == 1:
        return avail[0], avail[0]
    return avail[0], avail[-1]


def run_loop(mode: str, arg: str, seconds: float, cpu: int, wrap: Sequence[str] = (),
             rate: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Run the C loop pinned on ``cpu`` (optionally under ``wrap``, e.g. strace) and return
    its JSON."""
    cmd = [*wrap, "taskset", "-c", str(cpu), str(LOOP), mode, arg, f"{seconds:g}"]
    if rate:
        cmd.append(f"{rate:g}")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 40 + 60)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: rc={p.returncode}: {p.stderr.strip()[-500:]}")
    line = [x for x in p.stdout.splitlines() if x.startswith("{")][-1]
    return dict(json.loads(line))


# ---- host ------------------------------------------------------------------------------------


def _version(cmd: Sequence[str], pattern: str = r"(\d+\.\d+(?:\.\d+)?)") -> str:
    if not shutil.which(cmd[0]):
        return "absent"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"
    m = re.search(pattern, p.stdout + p.stderr)
    return m.group(1) if m else (p.stdout + p.stderr).strip().splitlines()[0][:80]


def host_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        from tracefleet.agent.kernel import libbpf

        libbpf_version = libbpf.version()
    except Exception as e:  # pragma: no cover - reported, not fatal
        libbpf_version = f"error: {e}"
    return {
        "kernel": platform.release(),
        "kernel_full": " ".join(platform.uname()),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_total_kb": _meminfo("MemTotal"),
        "tools": {
            "bpftrace": _version(["bpftrace", "--version"]),
            "strace": _version(["strace", "-V"]),
            "clang": _version(["clang", "--version"]),
            "gcc": _version(["gcc", "--version"]),
            "python": platform.python_version(),
            "libbpf": libbpf_version,
        },
    }


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def busy_processes(interval: float = 1.0, threshold: float = 10.0) -> list[dict[str, Any]]:
    """Processes using more than ``threshold`` % of a core over ``interval`` seconds: on a
    shared machine, the neighbours the measurements compete with."""

    def snap() -> dict[int, tuple[str, float]]:
        out = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                comm = s[s.index("(") + 1 : s.rindex(")")]
                fields = s[s.rindex(")") + 2 :].split()
                out[int(d)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
        return out

    a = snap()
    time.sleep(interval)
    b = snap()
    busy = []
    for pid, (comm, cpu) in b.items():
        if pid in a:
            pct = 100.0 * (cpu - a[pid][1]) / interval
            if pct >= threshold:
                busy.append({"pid": pid, "comm": comm, "cpu_percent": round(pct, 1)})
    return sorted(busy, key=lambda x: -float(x["cpu_percent"]))


def stop(p: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGINT, then SIGTERM, then SIGKILL (a tracer started from a background job may have
    SIGINT ignored)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        if p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            log(f"pid {p.pid} ignored {sig.name} for {grace:g}s")
    p.kill()
    p.wait()
