"""Enable bits: flipping one takes effect on the next syscall, with no reload; a set that
stays off is detached after the hold time, and re-attached (still without a reload) when
enabled again. Checked in the kernel's own view (bpftool), not only through the agent."""

from __future__ import annotations

import time

import pytest

from tests.bpf.conftest import run_workload
from tests.bpf.kernel_view import enabled_bits, linked_prog_ids
from tests.conftest import scaled, wait_until
from tracefleet.agent.capture.engine import EventSetConfig
from tracefleet.agent.kernel import libbpf

pytestmark = pytest.mark.bpf


def prog_ids(engine, name: str) -> set[int]:
    fds = engine._sets[name].loaded.program_fds()
    return {libbpf.prog_stats(fd)[0] for fd in fds.values()}


def file_attached(engine) -> bool:
    """The engine's own view, read under its lock (so its in-flight clear-out is done)."""
    return next(s.attached for s in engine.statuses() if s.name == "file")


def opened(cap, w, timeout: float = 10.0) -> bool:
    """Whether the workload's open was captured; waits up to ``timeout`` for it (the
    consumer polls every 20 ms, but a loaded CI machine or the emulated guest is slow)."""
    want = w["calls"][0]["expect"]
    evs = cap.wait_for(
        lambda e: e["pid"] == w["pid"] and e["args"]["pathname"]["value"] == want, timeout=timeout
    )
    return bool(evs)


def test_bit_toggles_without_reload_and_detach_after_hold(capture, workloads):
    # the engine's own consumer thread detaches idle sets (every second): the test never
    # calls detach_idle() itself, it watches the kernel's view. A hold of a few seconds,
    # scaled to the machine so the "on again within the hold" step fits inside it.
    hold = scaled(3.0)
    cap = capture(["file"], hold_seconds=hold)
    eng = cap.engine
    ids = prog_ids(eng, "file")
    some = next(iter(ids))
    assert ids <= linked_prog_ids()
    assert enabled_bits(some) & 1

    assert opened(cap, run_workload("warm", "openat"))

    # off: the bit clears at once, programs stay attached (same ids: no reload)
    eng.apply({"file": EventSetConfig("file", False)})
    assert enabled_bits(some) & 1 == 0
    assert ids <= linked_prog_ids()
    assert not opened(cap, run_workload("warm", "openat"), timeout=1.0)

    # on again within the hold time: same programs, events flow on the next syscall
    eng.apply({"file": EventSetConfig("file", True)})
    assert prog_ids(eng, "file") == ids
    assert opened(cap, run_workload("warm", "openat"))

    # off again: still attached right after, and detached by the engine itself once the
    # hold time has passed, never before it (the clock is read before the disable, so a
    # detach seen earlier than ``hold`` after it means the hold was not honoured)
    t_off = time.monotonic()
    eng.apply({"file": EventSetConfig("file", False)})
    assert ids <= linked_prog_ids(), "detached at once: the hold time was not honoured"
    wait_until(
        lambda: not (ids & linked_prog_ids()) and not file_attached(eng),
        timeout=hold + scaled(15.0),
        what="the engine to detach the disabled set after its hold time (bpftool link show)",
        every=0.05,
    )
    waited = time.monotonic() - t_off
    assert waited >= hold, f"detached {waited:.2f}s after disable, before the {hold}s hold"
    assert eng.inflight_count("file") == 0

    # enabled again: re-attached without a reload (the verified programs are kept)
    eng.apply({"file": EventSetConfig("file", True)})
    assert prog_ids(eng, "file") == ids
    assert ids <= linked_prog_ids()
    assert opened(cap, run_workload("warm", "openat"))


def test_close_leaves_nothing_attached(capture, workloads):
    cap = capture(["file", "net"], poll_ms=20)  # a private engine: this test closes it
    ids = prog_ids(cap.engine, "file") | prog_ids(cap.engine, "net")
    assert ids <= linked_prog_ids()
    cap.engine.close()
    assert not (ids & linked_prog_ids())
