"""Section 1: cost per syscall under each tracing condition, all conditions interleaved in one
run (round-robin, R rounds), loop pinned on one CPU, tracers on the other."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.common import (
    EMPTY_OBJ,
    LOOP_COMM,
    cpus,
    log,
    pinned,
    run_loop,
    stop,
    summary,
)

CONDITIONS = (
    "untraced",
    "floor",
    "tf-capture",
    "tf-bit-off",
    "tf-detached",
    "tf-capture-nowake",
    "bpftrace",
    "strace",
)
# Conditions that must run in this order (one engine's life: on, bit off, detached) form one
# block; the blocks rotate from round to round so no condition always runs first (right after
# strace exits, say) -- position effects spread over all of them.
BLOCKS: tuple[tuple[str, ...], ...] = (
    ("untraced",),
    ("floor",),
    ("tf-capture", "tf-bit-off", "tf-detached"),
    ("tf-capture-nowake",),
    ("bpftrace",),
    ("strace",),
)
# strace stops the loop at every syscall: its cost is not in the loop's CPU time, only in
# elapsed time, so strace is judged on wall time.
WALL_ONLY = ("strace",)
BPFTRACE_READY = "TF-BENCH-READY"
RING_BYTES = 512 << 20
BPFTRACE_PAGES = 16384


@dataclass(frozen=True)
class Workload:
    name: str
    mode: str  # loop mode
    arg: str
    event_set: str
    tracepoints: tuple[str, ...]  # what the floor attaches (what tracefleet hits)
    bpftrace_action: str  # probe body printing the same argument
    strace_filter: str


def workloads(tmpfs: Path) -> list[Workload]:
    return [
        Workload(
            "openat+close (tmpfs)",
            "openat",
            str(tmpfs / f"tf-bench-{os.getpid()}"),
            "file",
            ("sys_enter_openat", "sys_exit_openat"),
            'tracepoint:syscalls:sys_enter_openat /comm == "%s"/ '
            '{ printf("%%s\\n", str(args->filename)); }',
            "openat",
        ),
        Workload(
            "connect (UDP, loopback)",
            "connect",
            "9",
            "net",
            ("sys_enter_connect", "sys_exit_connect"),
            'tracepoint:syscalls:sys_enter_connect /comm == "%s"/ '
            '{ printf("%%r\\n", buf(args->uservaddr, args->addrlen)); }',
            "connect",
        ),
        # The `vfs` set on the same file-heavy loop: two records per iteration (open, and
        # close with the bytes added up). Its hook is the kernel's choice (fentry where
        # trampolines load, else the syscall tracepoints below, which the floor attaches).
        Workload(
            "vfs open+close (tmpfs)",
            "openat",
            str(tmpfs / f"tf-bench-vfs-{os.getpid()}"),
            "vfs",
            ("sys_exit_openat", "sys_enter_close", "sys_exit_close"),
            'tracepoint:syscalls:sys_enter_openat /comm == "%s"/ '
            '{ printf("%%s\\n", str(args->filename)); }',
            "openat,close",
        ),
    ]


@dataclass
class Floor:
    """The empty programs of empty.bpf.o, loaded once, attached per measurement."""

    obj: Any = None
    links: list[Any] = field(default_factory=list)

    def load(self) -> None:
        from tracefleet.agent.kernel.libbpf import BpfObject

        self.obj = BpfObject(str(EMPTY_OBJ))
        self.obj.load()

    def attach(self, tracepoints: tuple[str, ...]) -> None:
        for tp in tracepoints:
            self.links.append(self.obj.programs[f"empty_{tp}"].attach())

    def detach(self) -> None:
        for link in self.links:
            link.destroy()
        self.links.clear()

    def close(self) -> None:
        self.detach()
        if self.obj is not None:
            self.obj.close()


class Counter:
    """Sink of the engine: counts decoded events of the loop's comm."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, ev: dict[str, Any]) -> None:
        self.n += 1


@contextlib.contextmanager
def bpftrace(script: str, outdir: Path) -> Iterator[Path]:
    """bpftrace running ``script``, output to a file (an unread pipe makes it drop)."""
    out = outdir / f"bpftrace-{time.monotonic_ns()}.out"
    full = f'BEGIN {{ printf("{BPFTRACE_READY}\\n"); }} {script}'
    with open(out, "w") as f:
        # 64 MiB of perf buffer per CPU: a whole measurement fits, as for tracefleet's ring
        env = dict(os.environ, BPFTRACE_PERF_RB_PAGES=str(BPFTRACE_PAGES))
        p = subprocess.Popen(["bpftrace", "-e", full], stdout=f, stderr=subprocess.STDOUT,
                             env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while BPFTRACE_READY not in out.read_text(errors="replace"):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("bpftrace did not start: " + out.read_text()[-500:])
            time.sleep(0.05)
        yield out
    finally:
        stop(p)


def bpftrace_lines(out: Path) -> tuple[int, int]:
    """(lines printed, events bpftrace reported lost)."""
    lines = lost = 0
    with open(out, errors="replace") as f:
        for line in f:
            if line.startswith("Lost ") and "events" in line:
                with contextlib.suppress(ValueError):
                    lost += int(line.split()[1])
            elif line.strip() and BPFTRACE_READY not in line and "Attaching" not in line:
                lines += 1
    return lines, lost


def measure(rounds: int, seconds: float, tmpfs: Path, tmp: Path) -> dict[str, Any]:
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.capture.engine import EventSetConfig, Filters
    from tracefleet.agent.capture.eventsets import EVENT_SETS

    tracer_cpu, loop_cpu = cpus()
    result: dict[str, Any] = {
        "bpftrace_perf_rb_pages": BPFTRACE_PAGES,
        "rounds": rounds,
        "seconds_per_measurement": seconds,
        "loop_cpu": loop_cpu,
        "tracer_cpu": tracer_cpu,
        "tf_ring_bytes": RING_BYTES,
        "workloads": {},
    }
    floor = Floor()
    floor.load()
    counter = Counter()
    counter2 = Counter()
    with pinned({tracer_cpu}):
        # The ring holds a whole measurement (records of ~200 bytes), so none is dropped while
        # the agent decodes concurrently on the other CPU: the cost measured is the cost
        # with every event delivered. Wakeup and poll settings are the agent's defaults.
        engine = BpfEngine(EngineOptions(hold_seconds=3600.0, ring_bytes=RING_BYTES))
        engine.add_sink(counter)
        engine.start()
        # Same, but the producer never forces a wakeup (threshold = half the ring): the
        # consumer runs on its poll timer only. Shows what a forced wakeup per record costs
        # once the backlog passes wakeup_bytes (the default engine when its consumer lags).
        nowake = BpfEngine(EngineOptions(hold_seconds=3600.0, ring_bytes=RING_BYTES,
                                         wakeup_bytes=RING_BYTES // 2))  # fmt: skip
        nowake.add_sink(counter2)
        nowake.start()
    try:
        for wl in workloads(tmpfs):
            if wl.event_set not in EVENT_SETS:
                result["workloads"][wl.name] = {
                    "skipped": f"event set {wl.event_set!r} is not in this agent "
                    f"(known: {', '.join(EVENT_SETS)}); hook kept for when it lands"
                }
                log(f"overhead: {wl.name}: skipped (no {wl.event_set} event set)")
                continue
            log(f"overhead: {wl.name}: {rounds} rounds x {len(CONDITIONS)} conditions")
            samples: dict[str, list[float]] = {c: [] for c in CONDITIONS}  # CPU ns/iter
            wall: dict[str, list[float]] = {c: [] for c in CONDITIONS}  # wall ns/iter
            keys = ("iters", "events", "dropped", "delivered", "bpftrace_lines",
                    "bpftrace_lost", "nowake_dropped")  # fmt: skip
            delivery: dict[str, list[int]] = {k: [] for k in keys}
            flt = Filters(comms=(LOOP_COMM,))

            def tf_on(eng: Any = engine, wl: Workload = wl, flt: Filters = flt) -> None:
                st = eng.apply({wl.event_set: EventSetConfig(wl.event_set, True, flt)})
                err = [s.error for s in st if s.name == wl.event_set and s.error]
                if err:
                    raise RuntimeError(f"enable {wl.event_set}: {err[0]}")

            def loop(wrap: tuple[str, ...] = (), wl: Workload = wl) -> dict[str, Any]:
                return run_loop(wl.mode, wl.arg, seconds, loop_cpu, wrap)

            strategy = ""
            for r in range(rounds):
                order = [c for b in BLOCKS[r % len(BLOCKS) :] + BLOCKS[: r % len(BLOCKS)]
                         for c in b]  # fmt: skip
                for cond in order:
                    res: dict[str, Any]
                    if cond == "untraced":
                        res = loop()
                    elif cond == "floor":
                        floor.attach(wl.tracepoints)
                        try:
                            res = loop()
                        finally:
                            floor.detach()
                    elif cond == "tf-capture":
                        tf_on()
                        strategy = next(
                            s.strategy for s in engine.statuses() if s.name == wl.event_set
                        )
                        k0 = engine.kernel_counters(wl.event_set)
                        c0 = counter.n
                        res = loop()
                        _wait_drained(engine, wl.event_set, k0, counter, c0)
                        k1 = engine.kernel_counters(wl.event_set)
                        delivery["iters"].append(int(res["iters"]))
                        delivery["events"].append(k1["events"] - k0["events"])
                        delivery["dropped"].append(k1["dropped"] - k0["dropped"])
                        delivery["delivered"].append(counter.n - c0)
                    elif cond == "tf-bit-off":
                        engine.apply({})  # bit cleared, programs stay attached (hold time)
                        res = loop()
                    elif cond == "tf-detached":
                        engine.detach_idle(now=time.monotonic() + 1e9)
                        res = loop()
                    elif cond == "tf-capture-nowake":
                        tf_on(nowake)
                        k0 = nowake.kernel_counters(wl.event_set)
                        c0 = counter2.n
                        try:
                            res = loop()
                            _wait_drained(nowake, wl.event_set, k0, counter2, c0)
                        finally:
                            nowake.apply({})
                            nowake.detach_idle(now=time.monotonic() + 1e9)
                        k1 = nowake.kernel_counters(wl.event_set)
                        delivery["nowake_dropped"].append(k1["dropped"] - k0["dropped"])
                    elif cond == "bpftrace":
                        with bpftrace(wl.bpftrace_action % LOOP_COMM, tmp) as out:
                            res = loop()
                        lines, lost = bpftrace_lines(out)
                        out.unlink()
                        delivery["bpftrace_lines"].append(lines)
                        delivery["bpftrace_lost"].append(lost)
                    else:
                        res = loop(("strace", "-f", "-qq", "-e", f"trace={wl.strace_filter}",
                                    "-o", "/dev/null"))  # fmt: skip
                    cpu_ns = float(res["ns"] if cond in WALL_ONLY else res["cpu_ns"])
                    samples[cond].append(cpu_ns / float(res["iters"]))
                    wall[cond].append(float(res["ns_per_iter"]))
                log(f"overhead: {wl.name}: round {r + 1}/{rounds}: " + ", ".join(
                    f"{c} {samples[c][-1]:.0f}" for c in CONDITIONS))  # fmt: skip
            stats = {c: summary(v) for c, v in samples.items()}
            for c, v in wall.items():
                stats[c]["wall_median"] = summary(v)["median"]
            unt = stats["untraced"]["median"]
            flo = stats["floor"]["median"]
            for st in stats.values():
                st["ratio_untraced"] = st["median"] / unt if unt else 0.0
                st["ratio_floor"] = st["median"] / flo if flo else 0.0
            result["workloads"][wl.name] = {
                "event_set": wl.event_set,
                "strategy": strategy,
                "ns_per_iter": stats,
                "metric": "CPU time of the loop process per iteration (ns), except strace: "
                "elapsed time (the tracee is stopped, not running, while strace works); "
                "wall_median is elapsed time, which also counts time the loop was preempted",
                "samples": samples,
                "samples_wall": wall,
                "capture_delivery": {
                    "iterations": sum(delivery["iters"]),
                    "kernel_written": sum(delivery["events"]),
                    "kernel_dropped": sum(delivery["dropped"]),
                    "decoded_by_agent": sum(delivery["delivered"]),
                    "bpftrace_lines": sum(delivery["bpftrace_lines"]),
                    "bpftrace_lost": sum(delivery["bpftrace_lost"]),
                    "nowake_dropped": sum(delivery["nowake_dropped"]),
                },
            }
    finally:
        engine.close()
        nowake.close()
        floor.close()
    return result


def _wait_drained(engine: Any, name: str, k0: dict[str, int], counter: Counter, c0: int,
                  timeout: float = 10.0) -> None:  # fmt: skip
    """Wait until the consumer decoded every record the kernel wrote (EVENTS counts records
    written, DROPPED the ones that found the ring full)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        k = engine.kernel_counters(name)
        want = k["events"] - k0["events"]
        got = counter.n - c0
        if got >= want:
            return
        if got != last:
            last, since = got, time.monotonic()
        elif time.monotonic() - since > 1.0:
            return
        time.sleep(0.02)
