"""user_events: what an application pays and how fast the kernel-written bit follows the agent.

- emitter cost per call (``tracefleet.agent.emit.UserEvent``): ``emit()`` with the event
  disabled (nobody attached: one load of the enable word), enabled (the agent's perf rings
  attached: the write reaches them), and ``write()``, an emitter without the enable check,
  while nobody listens (the kernel takes the write and discards it);
- the bit's round trip: a C producer (build/workloads/user_events_emit) spins on its enable
  word; time from just before the agent opens its rings to the producer seeing the bit set,
  and from just before they close to it seeing the bit clear (both CLOCK_MONOTONIC);
- enable to first event on this node: a Python application that emits every ~1 ms whether
  anyone listens or not; time from the agent's enable (find the event, open the rings) to
  its first record read back by the consumer. The fleet path (controller, agent's 1 s batch)
  is printed by tests/bpf/test_user_events.py::test_fleet_enable_user_event_through_controller.

Rounds interleave the emitter conditions (order rotated). Where the kernel lacks user_events
the section says so, with the command that runs it in the 6.12 guest (GUEST_COMMAND).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench.common import summary

ROOT = Path(__file__).resolve().parents[2]
TRACEFS = Path("/sys/kernel/tracing")
PRODUCER = ROOT / "build" / "workloads" / "user_events_emit"
GUEST_COMMAND = (
    "TRACEFLEET_KERNELS_DIR=<dir with the 6.12 bzImage> .venv/bin/python tests/vm/run.py "
    "--kernel 6.12 -q --tests tests/bpf/test_user_events.py --memory 2G -- -s -k bench_section"
)
EMITTER_CONDITIONS = ("disabled", "enabled", "no check, nobody listening")
DEADLINE_S = 30.0 * (10.0 if os.environ.get("TRACEFLEET_IN_VM") == "1" else 1.0)


def emit_loop(event: str) -> str:
    """An application that emits ``event`` (u32 n) all along, listened to or not (the
    enable-to-first-event figures): emit() is one load of the enable word while nobody
    listens. Prints "ready" once registered."""
    return f"""
import time
from tracefleet.agent import emit
ev = emit.UserEvent({event!r}, "u32 n")
assert ev.registered, ev.reason
print("ready", flush=True)
i = 0
while True:
    i += ev.emit(i)
    time.sleep(0.001)
"""


def measure(rounds: int, calls: int) -> dict[str, Any]:
    """The section's results; {"skipped": why, "run_in_guest": command} without user_events."""
    from tracefleet.agent.capture import userevents

    out: dict[str, Any] = {
        "kernel": os.uname().release,
        "emulated": os.environ.get("TRACEFLEET_IN_VM") == "1",
        "rounds": rounds,
        "calls_per_round": calls,
        "perf_reader": perf_reader_rate(rounds, calls * 30),
    }
    ok, why = userevents.available(TRACEFS)
    if not ok:
        return out | {"skipped": f"no user_events here: {why}", "run_in_guest": GUEST_COMMAND}
    if not PRODUCER.exists():
        return out | {"skipped": f"{PRODUCER} missing: run `make workloads`",
                      "run_in_guest": GUEST_COMMAND}  # fmt: skip
    return out | {
        "emitter_ns_per_call": emitter_cost(rounds, calls),
        "bit_round_trip_us": bit_round_trip(rounds),
        "enable_to_first_event_ms": enable_to_first_event(rounds),
    }


def perf_reader_rate(rounds: int, records: int) -> dict[str, Any]:
    """records/s of the two perf-ring readers draining the same kind of full ring: this
    thread's getppid calls on sys_enter_getppid (any kernel), the ring large enough to hold
    them all (nothing dropped); the order rotates from round to round. Each read gives the
    samples by column, payloads included; compiled_stamps_only: without payloads (what the
    agent reads when nobody decodes the events: counts and latency)."""
    from tracefleet.agent.capture import userevents

    fmt = TRACEFS / "events/syscalls/sys_enter_getppid/format"
    if not fmt.exists():
        return {"skipped": f"{fmt} missing (tracefs not mounted?)"}
    ok, why = userevents.compiled_reader_status()
    if not ok:
        return {"skipped": f"compiled reader unavailable: {why}"}
    tp_id, _ = userevents.parse_format(fmt.read_text())
    pages = 1 << (records * 64 // 4096).bit_length()  # ~56 bytes a record
    modes = ("compiled", "python", "compiled_stamps_only")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    got: dict[str, int] = dict.fromkeys(modes, 0)
    dropped = 0
    for r in range(rounds):
        for mode in modes[r % 3 :] + modes[: r % 3]:
            reader = mode.removesuffix("_stamps_only")
            ring = userevents.PerfTracepoint(tp_id, pages=pages, pid=os.getpid(), reader=reader)
            with ring:
                for _ in range(records):
                    os.getppid()
                t = time.perf_counter_ns()
                b = ring.read_batch(payloads=mode != "compiled_stamps_only")
                dt = time.perf_counter_ns() - t
            if len(b) == 0:
                raise RuntimeError(f"{mode} reader: no record read")
            rates[mode].append(len(b) / (dt / 1e9))
            got[mode] += len(b)
            dropped += ring.counters.dropped
    out = {"records_per_round": records, "pages_per_ring": pages, "read": got, "dropped": dropped}
    return out | {f"{k}_records_per_s": summary(v) for k, v in rates.items()}


def emitter_cost(rounds: int, calls: int) -> dict[str, Any]:
    """ns per call of each emitter condition over ``rounds`` interleaved rounds; the enabled
    rounds' records are read back and counted (delivered + dropped must be the calls)."""
    from tracefleet.agent import emit
    from tracefleet.agent.capture import userevents

    ev = emit.UserEvent("tf_bench_cost", "u32 n; char[16] msg")
    if not ev.registered:
        raise RuntimeError(f"tf_bench_cost: {ev.reason}")
    per: dict[str, list[float]] = {c: [] for c in EMITTER_CONDITIONS}
    delivered = dropped = nocheck_accepted = 0
    nocheck_error = ""
    try:

        def per_call(fn: Any) -> float:
            t = time.perf_counter_ns()
            for i in range(calls):
                fn(i, "cost")
            return (time.perf_counter_ns() - t) / calls

        for r in range(rounds):
            k = r % len(EMITTER_CONDITIONS)
            for cond in EMITTER_CONDITIONS[k:] + EMITTER_CONDITIONS[:k]:
                if cond == "disabled":
                    before = ev.emitted
                    per[cond].append(per_call(ev.emit))
                    if ev.emitted != before:
                        raise RuntimeError("tf_bench_cost wrote while nobody listened")
                elif cond == "no check, nobody listening":
                    before = ev.emitted
                    per[cond].append(per_call(ev.write))
                    nocheck_accepted += ev.emitted - before
                    nocheck_error = ev.last_error
                else:
                    # the whole round fits (~80 bytes a record): the cost of a delivered one
                    pages = 1 << max(4, (calls * 96 // 4096).bit_length())
                    c = userevents.UserEventConsumer("tf_bench_cost", TRACEFS, pages=pages)
                    with c:
                        _wait(lambda: ev.enabled, "tf_bench_cost enable bit")
                        before = ev.emitted
                        per[cond].append(per_call(ev.emit))
                        if ev.emitted - before != calls:
                            raise RuntimeError(f"enabled emit failed: {ev.last_error}")
                        got = sum(1 for rec in c.perf.read() if rec[0] == os.getpid())
                    delivered += got
                    dropped += c.counters.dropped
                    _wait(lambda: not ev.enabled, "tf_bench_cost enable bit cleared")
    finally:
        ev.close()
    out: dict[str, Any] = {c: summary(v) for c, v in per.items()}
    out["enabled_records_read"] = delivered
    out["enabled_records_dropped"] = dropped
    out["enabled_calls"] = calls * len(per["enabled"])
    out["nocheck_writes_accepted"] = nocheck_accepted
    out["nocheck_calls"] = calls * len(per["no check, nobody listening"])
    out["nocheck_last_error"] = nocheck_error  # the kernel refuses a write nobody listens to
    return out


def _wait(fn: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not fn():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {DEADLINE_S:.0f} s waiting for {what}")
        time.sleep(0.001)


class _Producer:
    """user_events_emit over stdin, one JSON answer per command."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([str(PRODUCER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.hello = self.answer()

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"user_events_emit exited with {self.proc.wait()}")
        return dict(json.loads(line))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.send("quit")
        self.proc.wait(timeout=DEADLINE_S)


def bit_round_trip(rounds: int) -> dict[str, Any]:
    """us from the agent's open to the producer seeing bit 31 set, and close to clear."""
    from tracefleet.agent.capture import userevents

    prod = _Producer()
    on_us: list[float] = []
    off_us: list[float] = []
    try:
        if prod.hello["bit"] != 0:
            raise RuntimeError("tf_test's bit is set before this benchmark attached: "
                               "another tracer uses it; stop it and run again")  # fmt: skip
        for _ in range(rounds):
            consumer = userevents.UserEventConsumer("tf_test", TRACEFS)
            # the producer is told to watch first, so it sees the change when it happens
            # (if it read the command late, the figure is longer, never shorter)
            prod.send(f"wait 1 {int(DEADLINE_S * 1000)}")
            time.sleep(0.05)
            t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            consumer.open()
            on = prod.answer()
            prod.send(f"wait 0 {int(DEADLINE_S * 1000)}")
            time.sleep(0.05)
            t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            consumer.close()
            off = prod.answer()
            if on["timeout"] or off["timeout"]:
                raise RuntimeError(f"the enable bit did not follow: {on}, {off}")
            on_us.append((on["t_ns"] - t0) / 1e3)
            off_us.append((off["t_ns"] - t1) / 1e3)
    finally:
        prod.close()
    return {"attach_to_set": summary(on_us), "detach_to_clear": summary(off_us)}


def enable_to_first_event(rounds: int) -> dict[str, Any]:
    """ms from enabling (find the event, open its rings) to the first record read back, for
    an application that was emitting all along (every ~1 ms: up to that much is waiting)."""
    from tracefleet.agent.capture import userevents

    app = subprocess.Popen([sys.executable, "-c", emit_loop("tf_bench_lat")],
                           stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    ms: list[float] = []
    try:
        assert app.stdout is not None
        if app.stdout.readline() != "ready\n":
            raise RuntimeError(f"the emitting application failed ({app.wait()})")
        for _ in range(rounds):
            t0 = time.monotonic_ns()
            with userevents.UserEventConsumer("tf_bench_lat", TRACEFS) as c:
                deadline = time.monotonic() + DEADLINE_S
                while not any(e.pid == app.pid for e in c.poll(0.05)):
                    if time.monotonic() > deadline:
                        raise RuntimeError("tf_bench_lat: no event from the application")
                ms.append((time.monotonic_ns() - t0) / 1e6)
    finally:
        app.kill()
        app.wait(timeout=DEADLINE_S)
    return summary(ms)


def render(r: dict[str, Any]) -> list[str]:
    def mmm(s: dict[str, float], unit: str) -> str:
        return f"{s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}] {unit}"

    p = r["perf_reader"]
    if "skipped" in p:
        reader = [f"perf-ring reader: skipped: {p['skipped']}"]
    else:
        c, py = p["compiled_records_per_s"], p["python_records_per_s"]
        st = p["compiled_stamps_only_records_per_s"]
        reader = [
            f"perf-ring reader (sys_enter_getppid, {p['records_per_round']} records a round, "
            f"{p['pages_per_ring']} pages; read {sum(p['read'].values())}, dropped "
            f"{p['dropped']}):",
            f"  {'compiled':<22}{mmm(c, 'records/s')} "
            f"({c['median'] / max(py['median'], 1):.1f}x Python)",
            f"  {'Python':<22}{mmm(py, 'records/s')}",
            f"  {'compiled, no payloads':<22}{mmm(st, 'records/s')}",
        ]
    if "skipped" in r:
        return [f"user_events skipped: {r['skipped']}",
                f"run it in the 6.12 guest: {r['run_in_guest']}", *reader]  # fmt: skip
    e = r["emitter_ns_per_call"]
    tcg = " (emulated guest, TCG: slower than a real CPU)" if r["emulated"] else ""
    out = [
        f"Linux {r['kernel']}{tcg}; {r['rounds']} rounds; median [min-max]",
        f"emitter (tracefleet.agent.emit, Python) per call, {r['calls_per_round']} calls a round:",
    ]
    for c in EMITTER_CONDITIONS:
        out.append(f"  {c:<28} {mmm(e[c], 'ns')}")
    out.append(
        f"  enabled: {e['enabled_records_read']} of {e['enabled_calls']} records read back, "
        f"{e['enabled_records_dropped']} dropped; no check: {e['nocheck_writes_accepted']} of "
        f"{e['nocheck_calls']} writes accepted by the kernel (last error: "
        f"{e['nocheck_last_error'] or 'none'})"
    )
    b = r["bit_round_trip_us"]
    out.append(f"enable bit: attach->set {mmm(b['attach_to_set'], 'us')}, "
               f"detach->clear {mmm(b['detach_to_clear'], 'us')}")  # fmt: skip
    out.append(f"enable->first event (this node, consumer open to first record read): "
               f"{mmm(r['enable_to_first_event_ms'], 'ms')}")  # fmt: skip
    return out + reader
