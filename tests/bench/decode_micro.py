"""Micro-benchmark of the consumer's decode, without a kernel: a synthetic batch of
real-looking file records (the bench loop's openat of a missing /dev/shm path: ENOENT, comm
tf_bench_loop, its executable cached) in the compiled consumer's batch layout, handed to
RingConsumer with a counting sink, per record through on_record (decode.py; what the
Python decode does per batch entry) against the compiled decode (one decode_batch call, then
on_events). Interleaved rounds (the order alternates), pinned to one CPU, timed in the thread's CPU
time (a shared machine's preemptions are not counted; its cache contention is); < 30 s.

    taskset -c 1 .venv/bin/python tests/bench/decode_micro.py [--records N] [--rounds R]

No root: nothing is loaded. The compiled consumer's aggregates are not in this loop (no
tf_fast: the decoded records are not counted there; on_record's Python aggregates are).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import struct
import threading
import time
import types
from typing import Any

from tracefleet.agent.capture import cdecode, fastring
from tracefleet.agent.capture.accounting import new_aggregates
from tracefleet.agent.capture.consumer import RingConsumer
from tracefleet.agent.capture.contain import ErrorCounter
from tracefleet.agent.capture.decode import encode_record
from tracefleet.agent.capture.enginestate import EngineOptions, SetState
from tracefleet.agent.capture.eventsets import FILE
from tracefleet.agent.capture.exe import ExeResolver
from tracefleet.agent.kernel.abi import EventSetId, Kind, Status, Strategy, Syscall, TfEvent, TfStr

EXE = (0x1234, 0xFD00001, 7)
EXE_PATH = b"/work/main/build/bench/tf_bench_loop"


def records(n: int) -> list[bytes]:
    out = []
    path = b"/dev/shm/tf-bench-missing/x"
    for i in range(n):
        e = TfEvent()
        h = e.hdr
        h.ts_ns = 1_000_000_000_000 + i * 3_000
        h.exit_ns = h.ts_ns + 1_500
        h.cgroup_id, h.ret, h.pid, h.tid = 4242, -2, 31337, 31337
        h.kind, h.syscall, h.event_set = Kind.SYSCALL, Syscall.OPENAT, EventSetId.FILE
        h.strategy, h.comm = Strategy.SLEEPABLE, b"tf_bench_loop"
        h.ctx_ok, h.ppid, h.uid, h.gid = 1, 31300, 0, 0
        h.exe_ino, h.exe_dev, h.exe_gen = EXE
        e.iargs[0], e.iargs[1], e.iargs[2], e.iargs[3] = -100, 0x7FFC1000, 0, 0
        s = e.str[0]
        s.uptr, s.len, s.status, s.strategy = 0x7FFC1000, len(path), Status.OK, Strategy.SLEEPABLE
        ctypes.memmove(ctypes.addressof(s) + TfStr.data.offset, path, len(path))
        out.append(encode_record(e))
    return out


def batch(recs: list[bytes], now: int) -> ctypes.Array[ctypes.c_char]:
    parts = [struct.pack("=IIQ", len(r), 0, now) + r + bytes(-len(r) % 8) for r in recs]
    data = b"".join(parts)
    return ctypes.create_string_buffer(data, len(data))


def consumer() -> tuple[RingConsumer, list[int]]:
    n = [0]

    def count(ev: dict[str, Any]) -> None:
        n[0] += 1

    opts = EngineOptions()
    exes = ExeResolver(-1)
    exes._cache[EXE] = EXE_PATH.decode()  # as after the first lookup in tf_exes
    acct = types.SimpleNamespace(agg=new_aggregates())
    rc = RingConsumer(opts, {"file": SetState(spec=FILE, enabled=True)}, acct,  # type: ignore[arg-type]
                      None, ErrorCounter(), None, lambda: None, threading.RLock(), exes)  # type: ignore[arg-type]  # fmt: skip
    rc._sinks = [count]
    return rc, n


def python_round(rc: RingConsumer, buf: Any, size: int) -> None:
    """As FastRing._drain without a decoder: one copy of the batch, on_record per entry."""
    data = ctypes.string_at(ctypes.addressof(buf), size)
    off, unpack = 0, struct.Struct("=IIQ").unpack_from
    on_record = rc.on_record
    while off < size:
        n, flags, now = unpack(data, off)
        start = off + 16
        off = start + ((n + 7) & ~7)
        on_record(data[start : start + n], now, flags)


def compiled_round(rc: RingConsumer, dec: cdecode.BatchDecoder, buf: Any, size: int) -> None:
    start, addr = 0, ctypes.addressof(buf)
    while start < size:  # as FastRing._drain_decoded
        items, sampled, start = dec.decode_batch(addr, size, True, start)
        rc.on_events(items, sampled)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    print(f"pinned to CPUs {sorted(os.sched_getaffinity(0))}; {a.records} records per round")
    lib = fastring.library()
    assert lib is not None and cdecode.status()[0], cdecode.status()[1]
    dec = cdecode.BatchDecoder(lib, None)
    dec.tables.seed_exe(EXE, EXE_PATH)
    recs = records(a.records)
    buf = batch(recs, 1_000_000_000_000 + a.records * 3_000 + 50_000)
    size = len(buf)
    rates: dict[str, list[float]] = {"python": [], "compiled": []}
    t_start = time.monotonic()
    for r in range(a.rounds):
        order = ("python", "compiled") if r % 2 == 0 else ("compiled", "python")
        for mode in order:
            rc, n = consumer()
            t0 = time.thread_time()  # CPU time: a neighbour's preemption is not counted
            if mode == "python":
                python_round(rc, buf, size)
            else:
                compiled_round(rc, dec, buf, size)
            dt = time.thread_time() - t0
            assert n[0] == a.records, (mode, n[0])
            rates[mode].append(a.records / dt)
    for mode, rs in rates.items():
        print(
            f"{mode:9} median {statistics.median(rs):>10.0f} events/s of CPU  "
            f"(min {min(rs):.0f}, max {max(rs):.0f}; {1e6 / statistics.median(rs):.2f} us/event)"
        )
    ratio = statistics.median(rates["compiled"]) / statistics.median(rates["python"])
    print(f"ratio compiled/python: {ratio:.1f}x; {time.monotonic() - t_start:.1f} s")
    print(f"decoder counters: {dec.counters()}")


if __name__ == "__main__":
    main()
