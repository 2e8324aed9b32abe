"""Capture of arguments from non-resident pages, per strategy, on the running kernel.

Each case runs a workload from tests/workloads whose argument sits in a page that is not
mapped at syscall entry (the workload checks this itself via pagemap), and asserts the
exact value and status tracefleet reports. What each strategy must achieve:

  sleepable, fentry-sleepable  ok, every case (the copy helpers fault the page in)
  exit-retry                   recovered where the kernel reads the argument (structs:
                               reread, as nothing can check them), lost where the syscall
                               fails before reading it (EINVAL-early)
  user-fallback                recovered by process_vm_readv while the process lives
                               (the workload holds for a moment), except after a
                               successful exec, whose old memory is gone
  nofault                      lost (what bpftrace and every non-sleepable tracer get)
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.bpf.conftest import need_strategy, run_workload
from tests.conftest import time_scale

pytestmark = pytest.mark.bpf

STRATEGIES = ["sleepable", "fentry-sleepable", "exit-retry", "user-fallback", "nofault"]
SLEEPABLE = {"sleepable", "fentry-sleepable"}
# keeps the workload's memory alive for the user-space fallback: 400 ms on an idle host,
# scaled to the machine (emulated guest, load average)
HOLD_MS = round(400 * time_scale())


def expected(strategy: str, kernel_reads: bool, exec_ok: bool = False, blob: bool = False
             ) -> tuple[str, str]:  # fmt: skip
    """(status, strategy) a cold argument must get."""
    if strategy in SLEEPABLE:
        return "ok", strategy
    if strategy == "exit-retry":
        if not kernel_reads:
            return "lost", "exit-retry"
        return ("reread" if blob else "recovered"), "exit-retry"
    if strategy == "user-fallback":
        return ("lost", "nofault") if exec_ok else ("recovered", "user-fallback")
    return "lost", "nofault"


def check_arg(arg: dict[str, Any], want: tuple[str, str], value: Any) -> None:
    assert (arg["status"], arg["strategy"]) == want, arg
    if want[0] in ("ok", "recovered", "reread"):
        assert arg["value"] == value, arg
    else:
        assert arg["value"] is None, arg


def by_addr(events: list[dict[str, Any]], syscall: str, arg: str, call: dict[str, Any]
            ) -> list[dict[str, Any]]:  # fmt: skip
    """The workload's own call, told apart from the dynamic loader's by the address."""
    return [e for e in events if e["syscall"] == syscall
            and int(e["args"][arg]["addr"], 16) == int(call["addr"], 16)]  # fmt: skip


def own_calls(cap: Any, pid: int, syscall: str, arg: str, calls: list[dict[str, Any]],
              timeout: float = 5.0) -> list[dict[str, Any]]:  # fmt: skip
    """The events of the workload's own ``calls``, waited for until each has arrived (or the
    timeout): the dynamic loader's calls come first, so waiting for "any event of the pid"
    can return before the call under test is delivered."""
    want = {int(c["addr"], 16) for c in calls}
    return cap.wait_for(lambda e: e["pid"] == pid and e["syscall"] == syscall
                        and int(e["args"][arg]["addr"], 16) in want,
                        n=len(want), timeout=timeout)  # fmt: skip


def assert_cold(call: dict[str, Any]) -> None:
    # the workload read its own page tables just before the call
    if call["pte_present"] is not None:
        assert not all(call["pte_present"]), f"argument was resident, test is void: {call}"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode,kernel_reads", [("openat", True), ("einval", False)])
def test_rodata_path_of_fresh_exec(capture, workloads, strategy, mode, kernel_reads):
    """A freshly exec'd PIE opens a .rodata literal the kernel has not faulted in yet."""
    need_strategy(strategy, "file")
    cap = capture(["file"], strategy)
    w = run_workload("cold_rodata", mode, hold_ms=HOLD_MS)
    call = w["calls"][0]
    assert_cold(call)
    [ev] = own_calls(cap, w["pid"], "openat", "pathname", [call])
    assert ev["ret"] == -call["errno"]
    check_arg(ev["args"]["pathname"], expected(strategy, kernel_reads), call["expect"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_openat2_path_and_open_how(capture, workloads, strategy):
    need_strategy(strategy, "file")
    cap = capture(["file"], strategy)
    w = run_workload("cold_rodata", "openat2", hold_ms=HOLD_MS)
    path_call, how_call = w["calls"]
    [ev] = own_calls(cap, w["pid"], "openat2", "pathname", [path_call])
    want = expected(strategy, True)
    check_arg(ev["args"]["pathname"], want, path_call["expect"])
    how = bytes.fromhex(how_call["expect"])
    flags, mode, resolve = (int.from_bytes(how[i : i + 8], "little") for i in (0, 8, 16))
    check_arg(
        ev["args"]["how"],
        expected(strategy, True, blob=True),
        {"flags": flags, "mode": mode, "resolve": resolve},
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", ["connect", "connect6", "connect_unix"])
def test_sockaddr_of_connect(capture, workloads, strategy, mode):
    need_strategy(strategy, "net")
    cap = capture(["net"], strategy)
    w = run_workload("cold_rodata", mode, hold_ms=HOLD_MS)
    call = w["calls"][0]
    assert_cold(call)
    [ev] = own_calls(cap, w["pid"], "connect", "addr", [call])
    raw = bytes.fromhex(call["expect"])
    family = int.from_bytes(raw[:2], "little")
    if family == socket.AF_INET:
        value = {"family": "inet", "address": "127.0.0.1", "port": 9}
    elif family == socket.AF_INET6:
        value = {"family": "inet6", "address": "::1", "port": 9}
    else:
        value = {"family": "unix", "path": raw[2:].split(b"\0")[0].decode()}
    check_arg(ev["args"]["addr"], expected(strategy, True, blob=True), value)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exec_filename_and_argv(capture, workloads, strategy):
    """At sys_exit of a successful execve the old memory is gone: the non-sleepable rung
    recovers from sched_process_exec (the kernel's copies) instead."""
    need_strategy(strategy, "exec")
    cap = capture(["exec"], strategy)
    w = run_workload("cold_rodata", "exec")
    calls = {c["arg"]: c for c in w["calls"]}
    [ev] = own_calls(cap, w["pid"], "execve", "filename", [calls["filename"]])
    assert ev["ret"] == 0
    want = expected(strategy, True, exec_ok=True)
    check_arg(ev["args"]["filename"], want, calls["filename"]["expect"])
    argv = [calls[f"argv[{i}]"]["expect"] for i in range(3)]
    check_arg(ev["args"]["argv"], want, argv)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_swapped_out_anonymous_memory(capture, workloads, swap, strategy):
    """Paths in anonymous memory pushed out to swap (MADV_PAGEOUT) just before openat: the
    PTE holds a swap entry at entry, the kernel swaps the page in while reading it."""
    need_strategy(strategy, "file")
    cap = capture(["file"], strategy)
    w = run_workload("cold_anon_swap", "--count", "8", hold_ms=HOLD_MS)
    assert "skip" not in w, f"{w} with swap on {swap}"
    calls = w["calls"]
    assert len(calls) == 8
    assert w["paged_out"] > 0, f"nothing was paged out to {swap}: the test is void"
    evs = own_calls(cap, w["pid"], "openat", "pathname", calls)
    out = 0
    for c in calls:
        [ev] = by_addr(evs, "openat", "pathname", c)
        assert ev["ret"] == -c["errno"]
        if c["pte_present"] == [False]:
            out += 1
            check_arg(ev["args"]["pathname"], expected(strategy, True), c["expect"])
        else:  # swapped in again before the call (rare): read at entry
            assert ev["args"]["pathname"]["value"] == c["expect"], ev
    print(f"\nSWAP {strategy}: {w['paged_out']}/{len(calls)} paged out to {swap}, "
          f"{out} not resident at the call")  # fmt: skip
    assert out > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_file_mapping_after_cache_drop(capture, workloads, strategy):
    """30 paths 64 KiB apart in a private file mapping whose page cache was dropped."""
    need_strategy(strategy, "file")
    cap = capture(["file"], strategy)
    w = run_workload("cold_filemap", hold_ms=HOLD_MS)
    calls = w["calls"]
    assert len(calls) == 30
    evs = own_calls(cap, w["pid"], "openat", "pathname", calls)
    want = expected(strategy, True)
    for c in calls:
        [ev] = by_addr(evs, "openat", "pathname", c)
        check_arg(ev["args"]["pathname"], want, c["expect"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_string_crossing_into_cold_page(capture, workloads, strategy):
    need_strategy(strategy, "file")
    cap = capture(["file"], strategy)
    w = run_workload("cold_cross", hold_ms=HOLD_MS)
    call = w["calls"][0]
    assert call["pte_present"] in (None, [True, False])
    [ev] = own_calls(cap, w["pid"], "openat", "pathname", [call])
    check_arg(ev["args"]["pathname"], expected(strategy, True), call["expect"])


@pytest.mark.parametrize("strategy", ["exit-retry", "nofault"])
def test_warm_control_is_ok_everywhere(capture, workloads, strategy):
    """Resident arguments are read at entry with status ok, whatever the strategy."""
    need_strategy(strategy, "file")
    cap = capture(["file"], strategy)
    w = run_workload("warm", "openat")
    [ev] = own_calls(cap, w["pid"], "openat", "pathname", [w["calls"][0]])
    assert (ev["args"]["pathname"]["status"], ev["args"]["pathname"]["strategy"]) == (
        "ok",
        "nofault" if strategy == "nofault" else "exit-retry",
    )
