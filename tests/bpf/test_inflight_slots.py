"""A call in flight that can never complete is counted lost exactly once, never hidden and
never counted twice (file and net keep it in task-local storage: bpf/include/tracefleet/
syscall_event.bpf.h).

  thread exits     threads parked in openat are released with the set's exit program gone:
                   each thread exits holding its call, which is counted `inflight_stale`
                   (sched_process_exit), once, and nothing stays in flight.
  detach, reattach threads parked in openat when the set is detached are counted lost then
                   (the agent's clear-out); the set is attached again before they return:
                   their exits, under the new attachment, neither deliver them nor count them
                   again.

Workload: tests/workloads/harden.c park mode (threads named tf-parker block in openat on a
FIFO until a line on stdin opens it for writing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bpf.test_hardening import _finish, _readline, _start
from tests.conftest import BPF_DIR, scaled, wait_until
from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
from tracefleet.agent.capture.engine import EventSetConfig, Filters

pytestmark = pytest.mark.bpf

PARKED = 64


@pytest.fixture
def engine(host: Any) -> Iterator[BpfEngine]:
    eng = BpfEngine(EngineOptions(bpf_dir=BPF_DIR, sets=("file",), user_fallback=False))
    try:
        eng.start()
        yield eng
    finally:
        eng.close()


def _park(engine: BpfEngine, workloads: Path, tmp_path: Path) -> tuple[Any, Filters]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = _start(workloads, "park", str(PARKED), str(fifo))
    flt = Filters(pids=(proc.pid,), comms=("tf-parker",))
    [st] = [s for s in engine.apply({"file": EventSetConfig("file", True, flt)})
            if s.name == "file"]  # fmt: skip
    assert st.enabled and st.attached, st
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    assert _readline(proc, scaled(60)) == "parked"
    return proc, flt


def _identity(acc: dict[str, int]) -> None:
    assert acc["unaccounted"] == 0, acc
    assert acc["passed"] + acc["missed"] >= PARKED and acc["passed"] <= PARKED, acc


def test_thread_exiting_with_its_call_in_flight_is_counted_once(engine, workloads, tmp_path):
    proc, _ = _park(engine, workloads, tmp_path)
    acc = engine.accounting("file")
    assert acc["in_flight"] == acc["passed"] > 0, acc
    # the calls' exit program goes away: the threads return from openat and exit with
    # their calls still in their slots
    st = engine._sets["file"]
    assert st.loaded is not None
    st.loaded.links[st.loaded.programs.index("tp_exit_openat")].destroy()
    assert _finish(proc)["opened"] == PARKED

    def settled() -> dict[str, int] | None:
        a = engine.accounting("file")
        return a if a["in_flight"] == 0 else None

    try:
        acc = wait_until(settled, timeout=scaled(10), what="no call in flight")
    except AssertionError as e:
        raise AssertionError(f"{e}; accounting {engine.accounting('file')}") from None
    k = engine.kernel_counters("file")
    print(f"\nthreads exited mid-call: {acc}, inflight_stale {k['inflight_stale']}")
    _identity(acc)
    assert acc["written"] == 0 and acc["lost"] == k["inflight_stale"] == acc["passed"], (acc, k)
    # a later detach finds nothing more to count
    engine.apply({"file": EventSetConfig("file", False)})
    assert engine.detach_idle(now=time.monotonic() + 1e6) == ["file"]
    again = engine.accounting("file")
    assert again["lost"] == acc["lost"] and again["in_flight"] == 0, again


def test_detach_with_calls_in_flight_counts_them_once(engine, workloads, tmp_path):
    proc, flt = _park(engine, workloads, tmp_path)
    passed = engine.accounting("file")["passed"]
    assert passed > 0
    engine.apply({"file": EventSetConfig("file", False, flt)})
    assert engine.detach_idle(now=time.monotonic() + 1e6) == ["file"]
    acc = engine.accounting("file")
    assert acc["lost"] == passed and acc["in_flight"] == 0, acc
    # attached again while the calls are still parked: their exits run, under the new
    # attachment, on slots taken under the old one
    [st] = [s for s in engine.apply({"file": EventSetConfig("file", True, flt)})
            if s.name == "file"]  # fmt: skip
    assert st.attached, st
    assert _finish(proc)["opened"] == PARKED
    acc = engine.accounting("file")  # the exits ran before the threads returned
    print(f"\ndetached with {passed} calls in flight, reattached, released: {acc}")
    _identity(acc)
    assert acc["written"] == 0 and acc["lost"] == acc["passed"] == passed, acc
    assert acc["in_flight"] == 0, acc
