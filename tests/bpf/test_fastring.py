"""The compiled ring consumer (agent/native/fastring.c) against the kernel's own counters,
and against the Python consumer on the same workload: the two paths cannot drift.

Aggregate-only capture (no sink, no sampling): the C side counts every record; Python sees
only the records it must decode (lost arguments for the user-space fallback)."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

import pytest

from tests.bpf.conftest import run_workload
from tests.conftest import BPF_DIR, scaled, wait_until
from tracefleet.agent.capture.engine import EventSetConfig, Filters

pytestmark = pytest.mark.bpf

OPENS = 2000


def _engine(compiled: bool, strategy: str | None = None) -> Any:
    from tracefleet.agent.capture import fastring
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.kernel.abi import Strategy

    forced = {"file": Strategy.from_label(strategy)} if strategy else {}
    eng = BpfEngine(EngineOptions(bpf_dir=BPF_DIR, hold_seconds=3600, sets=("file",),
                                  compiled_consumer=compiled, strategies=forced))  # fmt: skip
    ok, why = eng.consumer()
    if compiled:
        # a failure, not a skip: `make native` (part of `make workloads`) builds it
        assert ok, f"compiled consumer unavailable: {why}"
    eng.ensure_loaded("file")
    assert isinstance(eng._rb, fastring.FastRing) == compiled, eng._rb
    return eng


def _opens(eng: Any, n: int, sample_rate: float = 0.0) -> dict[str, Any]:
    """``n`` opens of /etc/hostname by one shell (pid filter) on a fresh engine; its
    cumulative aggregates once everything the kernel wrote has been consumed."""
    proc = subprocess.Popen(
        ["sh", "-c", f"echo ready; read go; i=0; while [ $i -lt {n} ]; do : < /etc/hostname; "
         "i=$((i+1)); done"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"  # its start-up (ld.so opens) is over
    cfg = EventSetConfig("file", True, Filters(pids=(proc.pid,)), sample_rate=sample_rate)
    eng.apply({"file": cfg})
    proc.communicate("go\n", timeout=scaled(60))
    k = eng.kernel_counters("file")
    # the consumer thread folds per poll: wait for the kernel's count, not for a time
    sa = wait_until(
        lambda: (t := eng.totals().get("file")) is not None and t.delivered >= k["events"] and t,
        timeout=scaled(30),
        what=f"the consumer to count the kernel's {k['events']} records",
    )
    eng.apply({})
    return {"kernel": k, "agg": sa}


@pytest.fixture
def engines(host: None) -> Any:
    made: list[Any] = []

    def make(compiled: bool, strategy: str | None = None) -> Any:
        eng = _engine(compiled, strategy)
        made.append(eng)
        eng.start()
        return eng

    yield make
    for eng in made:
        eng.close()


def test_compiled_counts_equal_kernel_and_python_path(engines: Any) -> None:
    results = {}
    for compiled in (True, False):
        eng = engines(compiled)
        r = _opens(eng, OPENS)
        k, sa = r["kernel"], r["agg"]
        assert k["dropped"] == 0, k
        # every record the kernel wrote, counted once, in the right syscall and bucket
        assert sa.delivered == k["events"], (compiled, sa.delivered, k)
        assert sa.events_by_syscall.get("openat") == OPENS, (compiled, sa.events_by_syscall)
        assert sum(sa.events_by_syscall.values()) == sa.delivered
        assert sa.latency.count == sa.delivered, (compiled, sa.latency.counts)
        if compiled:
            c = eng._rb.counters()
            assert c["forwarded"] == 0, c  # aggregate-only: no record went to Python
            assert c["short"] == 0 and c["nomem"] == 0, c
        results[compiled] = (sa.delivered, dict(sa.events_by_syscall))
        eng.close()
    assert results[True] == results[False], results


def test_compiled_forwards_lost_args_to_fallback(engines: Any) -> None:
    """No sink, no sampling: a lost argument still reaches the user-space fallback, which
    recovers it while the workload holds on. The rung is forced (nofault + user fallback) so
    that the path is lost at entry on every kernel (7.2's sleepable rung would read it)."""
    eng = engines(True, "user-fallback")
    assert eng._sets["file"].user_fallback, eng.capabilities()["features"]["user_fallback"]
    eng.apply({"file": EventSetConfig("file", True, Filters(comms=("cold_rodata",)))})
    before = eng.totals()["file"].outcomes.get(("user-fallback", "recovered"), 0)
    res = run_workload("cold_rodata", "einval", hold_ms=int(scaled(400)))
    assert res, res
    got = wait_until(
        lambda: eng.totals()["file"].outcomes.get(("user-fallback", "recovered"), 0) > before,
        timeout=scaled(10),
        what="the user-space fallback to recover the lost openat path",
    )
    assert got
    assert eng._rb.counters()["forwarded"] >= 1


def test_compiled_sink_error_is_contained(engines: Any) -> None:
    """A sink that fails on every other event: each failure is counted, every record is
    still counted and delivered to the other sink."""
    eng = engines(True)
    seen: list[dict[str, Any]] = []
    calls = [0]

    def bad(ev: dict[str, Any]) -> None:
        calls[0] += 1
        if calls[0] % 2:
            raise RuntimeError("sink failure")

    eng.add_sink(bad)
    eng.add_sink(seen.append)
    r = _opens(eng, 200)
    k, sa = r["kernel"], r["agg"]
    assert sa.delivered == k["events"]
    mine = [e for e in seen if e["syscall"] == "openat"]
    assert len(mine) == 200
    assert eng.errors.snapshot().get(("file", "sink"), 0) == (calls[0] + 1) // 2


def test_compiled_samples_without_a_sink(engines: Any) -> None:
    """Sample rate 1 and no sink: C forwards every record of the set as a sample (and still
    leaves the aggregation to Python for those, once each)."""
    eng = engines(True)
    r = _opens(eng, 100, sample_rate=1.0)
    k, sa = r["kernel"], r["agg"]
    assert sa.delivered == k["events"]
    samples = eng.sample_events(10_000)
    assert len(samples) == k["events"], (len(samples), k)
    assert sum(e["syscall"] == "openat" for e in samples) == 100
    assert eng._rb.counters()["forwarded"] == k["events"]


def _five_opens_on_go() -> subprocess.Popen[str]:
    """A shell that opens /etc/hostname five times once it reads "go" (its pid is known
    before: the filter is set first)."""
    proc = subprocess.Popen(
        ["sh", "-c", "echo ready; read go; for i in 1 2 3 4 5; do : < /etc/hostname; done"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


class _PausingLib:
    """The library, with the consumer thread's first flag push held at the push until the
    test releases it (the interleaving a loaded machine produced)."""

    def __init__(self, lib: Any, consumer: threading.Thread):
        self._lib = lib
        self._consumer = consumer
        self.paused = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def tf_fast_set(self, *args: Any) -> int:
        if threading.current_thread() is self._consumer and not self.paused.is_set():
            self.paused.set()
            self.release.wait()
        return int(self._lib.tf_fast_set(*args))


class _SignallingLock:
    """The engine's lock around its flag pushes: releases the paused consumer once another
    thread waits for it (where the fix makes add_sink wait)."""

    def __init__(self, lib: _PausingLib):
        self._lock = threading.Lock()
        self._lib = lib

    def __enter__(self) -> None:
        if threading.current_thread() is not self._lib._consumer:
            self._lib.release.set()
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_compiled_consumer_push_cannot_undo_add_sink(host: None) -> None:
    """The consumer thread reads "no sink" and is delayed before pushing that to C; a sink is
    added and the set enabled meanwhile; then the consumer's push lands and it polls. Every
    record the kernel wrote must still reach the sink (before the fix: none did, the C side
    only counted them; test_event_sets' file test under load, ~1 run in 8)."""
    from tracefleet.agent.capture import fastring

    eng = _engine(True)  # loaded, never synced: the consumer's first poll pushes the flags
    try:
        proc = _five_opens_on_go()
        rb = eng._rb
        consumer = threading.Thread(target=eng.poll_once, args=(0,), name="test-consumer")
        lib = rb._lib = _PausingLib(rb._lib, consumer)
        eng.ring._sync_lock = _SignallingLock(lib)
        consumer.start()
        lib.paused.wait()  # the consumer has read the state (no sink) and pushes it now
        seen: list[dict[str, Any]] = []
        eng.add_sink(seen.append)
        eng.apply({"file": EventSetConfig("file", True, Filters(pids=(proc.pid,)))})
        proc.communicate("go\n", timeout=scaled(60))
        lib.release.set()  # the push lands (unless add_sink waited for it), then the poll
        consumer.join()
        eng.drain()
        k = eng.kernel_counters("file")
        file_id = int(eng._sets["file"].spec.set_id)
        assert rb.flags(file_id) & fastring.SET_DELIVER, rb.flags(file_id)
        mine = [e for e in seen if e["pid"] == proc.pid and e["syscall"] == "openat"]
        assert k["events"] >= 5 and k["dropped"] == 0, k
        assert len(seen) == k["events"] and len(mine) == 5, (len(seen), rb.counters(), k)
    finally:
        eng.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_stop_and_drain_hands_over_what_is_queued(host: None, compiled: bool) -> None:
    """The agent's SIGTERM path: the abort that stops the consumer thread must not stick, the
    final drain hands every queued record to the sink (before the fix, with the compiled
    consumer: none, and the first was consumed without being counted)."""
    eng = _engine(compiled)
    try:
        proc = _five_opens_on_go()
        seen: list[dict[str, Any]] = []
        eng.add_sink(seen.append)
        eng.apply({"file": EventSetConfig("file", True, Filters(pids=(proc.pid,)))})
        proc.communicate("go\n", timeout=scaled(60))  # no consumer thread: all still queued
        k = eng.kernel_counters("file")
        assert k["events"] >= 5 and k["dropped"] == 0, k
        drained = eng.stop_and_drain()
        assert (drained, len(seen)) == (k["events"], k["events"]), (drained, len(seen), k)
        assert sum(e["syscall"] == "openat" for e in seen) == 5, seen
        assert eng.totals()["file"].delivered == k["events"]
    finally:
        eng.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_interrupt_in_a_sink_loses_no_record(host: None, compiled: bool) -> None:
    """A KeyboardInterrupt out of a sink (a program polling from its main thread) reaches
    the caller, and every record is still counted and handed over by the drains after it.
    Before the fix the compiled consumer dropped the rest of its batch: out of the ring,
    neither counted nor delivered (the Python consumer leaves them queued)."""
    eng = _engine(compiled)
    try:
        proc = _five_opens_on_go()
        seen: list[dict[str, Any]] = []
        interrupted = [0]

        def interrupting(ev: dict[str, Any]) -> None:
            if ev["syscall"] == "openat" and not interrupted[0]:
                interrupted[0] = 1
                raise KeyboardInterrupt

        eng.add_sink(seen.append)
        eng.add_sink(interrupting)
        eng.apply({"file": EventSetConfig("file", True, Filters(pids=(proc.pid,)))})
        proc.communicate("go\n", timeout=scaled(60))  # no consumer thread: all still queued
        k = eng.kernel_counters("file")
        assert k["events"] >= 5 and k["dropped"] == 0, k
        with pytest.raises(KeyboardInterrupt):
            eng.drain()
        eng.drain()  # what the interrupt left queued, if anything
        assert interrupted[0] == 1
        assert (len(seen), eng.totals()["file"].delivered) == (k["events"], k["events"]), k
        assert sum(e["syscall"] == "openat" for e in seen) == 5, seen
    finally:
        eng.close()
