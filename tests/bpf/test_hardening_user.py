"""Hardening, user-space side: a traced process cannot crash the agent, make its fallback read
another process, or kill the consumer unnoticed. Real kernel, real programs, C workloads.

- argv_guard: a failed execve whose argv array runs into a PROT_NONE page (it crashed
  `capture` with struct.error in the fallback): capture survives, the argv holds the strings
  before the guard page, `truncated` with EFAULT, and the next exec is still captured.
- pid_reuse: the caller exits and its pid goes to another process (clone3 set_tid) before the
  agent's fallback reads: the argument stays lost, marked pid-reused and counted, instead of
  the other process's bytes shown as `recovered`; the same workload with the caller alive is
  recovered exactly (the negative control).
- the consumer: a failure in its housekeeping is contained and counted, and it keeps
  consuming; if the thread dies anyway, /healthz and /readyz answer 503 with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WORKLOADS, wait_until

pytestmark = pytest.mark.bpf
AGENT = [sys.executable, "-m", "tracefleet.agent"]
# deadlines only: every wait returns as soon as its event happens (x10 in the emulated guest)
SCALE = 10 if os.environ.get("TRACEFLEET_IN_VM") else 1
DEADLINE = 60.0 * SCALE


def _lines_reader(stream: Any) -> tuple[list[str], threading.Thread]:
    lines: list[str] = []

    def run() -> None:
        for line in stream:
            lines.append(line)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return lines, t


@pytest.mark.parametrize(
    "variant",
    [["--pointers", "2"], ["--pointers", "0"], ["--pointers", "4"], ["--cut-string"]],
    ids=["2-pointers", "0-pointers", "4-pointers", "cut-string"],
)
def test_execve_argv_into_guard_page_does_not_crash_capture(host, workloads, tmp_path, variant):
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [*AGENT, "capture", "-e", "exec", "--comm", "argv_guard", "--strategy", "user-fallback",
         "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines, reader = _lines_reader(proc.stdout)
        wait_until(lambda: ready.exists() or proc.poll() is not None, DEADLINE, "capture ready")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        # it holds until its stdin closes: alive while the agent reads it
        wl = subprocess.Popen([str(WORKLOADS / "argv_guard"), *variant],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert wl.stdout
        w = json.loads(wl.stdout.readline())
        assert (w["ret"], w["errno"]) == (-1, 14)  # EFAULT: the kernel hit the guard page
        after = w["after"]

        def events() -> list[dict[str, Any]]:
            return [json.loads(x) for x in list(lines)]

        # the exec after the guard-page one is captured: the agent survived the first
        wait_until(
            lambda: proc.poll() is not None
            or any(e["args"]["filename"]["value"] == after["filename"] for e in events()),
            DEADLINE, "the exec after the guard-page exec",
        )  # fmt: skip
        assert proc.poll() is None, "capture died"
        wl.communicate(timeout=DEADLINE)
    finally:
        proc.send_signal(2)
        _, err = proc.communicate(timeout=DEADLINE)
    reader.join(DEADLINE)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    evs = [e for e in events() if e["pid"] == w["pid"]]
    assert len(evs) == 2, evs
    guard, nxt = evs
    assert guard["ret"] == -14 and guard["args"]["filename"]["value"] == "/bin/true"
    argv = guard["args"]["argv"]
    assert argv["addr"] == w["array_addr"]
    assert argv["error"] == "EFAULT"
    if w["args"]:
        # what the kernel could read before the guard page, and that it was cut there
        assert (argv["status"], argv["strategy"]) == ("truncated", "user-fallback")
        assert argv["value"] == w["args"]
    else:
        assert argv["status"] == "lost" and argv["value"] is None
    assert nxt["ret"] == -2 and nxt["args"]["argv"]["value"] == after["argv"]
    assert nxt["args"]["argv"]["status"] in ("ok", "recovered")
    # the summary accounts for both records, and no failure was contained: the cause is fixed
    line = next(x for x in err.splitlines() if x.strip().startswith("exec:"))
    assert "events=2 dropped=0" in line, line
    assert "record_errors={}" in line, line
    # the argument outcomes say what the fallback did with argv: truncated, not recovered
    if w["args"]:
        assert '"user-fallback/truncated": 1' in line, line
        assert '"user-fallback/recovered"' not in line, line
    else:
        assert '"nofault/lost": 1' in line, line


def _pid_reuse(capture: Any, tmp_path: Path, mode: str) -> tuple[dict[str, Any], Any, Any]:
    """Run pid_reuse under the user-fallback rung, the consumer held on the gate event until
    the workload has finished step 3. Returns (workload JSON, the caller's event, engine)."""
    from tracefleet.agent.capture.engine import Filters

    cap = capture(["file"], "user-fallback", Filters(comms=("pid_reuse",)))
    gate = str(tmp_path / "gate-absent")
    release = threading.Event()

    def gate_sink(ev: dict[str, Any]) -> None:
        if ev["args"].get("pathname", {}).get("value") == gate:
            release.wait(DEADLINE)  # the agent lags behind the workload, for certain

    cap.engine.add_sink(gate_sink)
    before = dict(cap.engine.fallback_rejected)
    proc = subprocess.Popen([str(WORKLOADS / "pid_reuse"), "--mode", mode, "--gate", gate],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout
        w = json.loads(proc.stdout.readline())
        release.set()
        [ev] = wait_until(
            lambda: [e for e in list(cap.events) if e["tid"] == w["caller_pid"]
                     and e["args"].get("pathname", {}).get("addr") == w["addr"]],
            DEADLINE, "the caller's openat",
        )  # fmt: skip
    finally:
        release.set()
        cap.engine.remove_sink(gate_sink)
        proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0
    rejected = {k: v - before.get(k, 0) for k, v in cap.engine.fallback_rejected.items()}
    return w, ev, {k: v for k, v in rejected.items() if v}


def test_fallback_refuses_a_reused_pid(capture, workloads, tmp_path):
    w, ev, rejected = _pid_reuse(capture, tmp_path, "reuse")
    assert w["reused_pid"] == w["caller_pid"]
    arg = ev["args"]["pathname"]
    assert arg["value"] != w["imposter_path"], "read the memory of the pid's new owner"
    assert (arg["status"], arg["value"], arg["fallback"]) == ("lost", None, "pid-reused")
    assert rejected == {("file", "pid-reused"): 1}


def test_fallback_reads_a_live_caller(capture, workloads, tmp_path):
    """Negative control: the same workload and lag, the caller alive: recovered exactly."""
    w, ev, rejected = _pid_reuse(capture, tmp_path, "alive")
    arg = ev["args"]["pathname"]
    assert (arg["status"], arg["strategy"], arg["value"]) == (
        "recovered", "user-fallback", w["caller_path"])  # fmt: skip
    assert "fallback" not in arg
    assert rejected == {}


class _Killed(BaseException):
    """Not an Exception: what no containment catches (it stands for anything that ends the
    thread), so the health endpoint must notice."""


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=DEADLINE) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _fail_once(engine: Any, exc: BaseException) -> threading.Event:
    """detach_idle raises ``exc`` on its next run (the consumer's once-a-second housekeeping),
    then works again; the returned event is set when it has raised."""
    raised = threading.Event()
    real = engine.detach_idle

    def detach_idle(*a: Any, **kw: Any) -> Any:
        if not raised.is_set():
            raised.set()
            raise exc
        return real(*a, **kw)

    engine.detach_idle = detach_idle
    return raised


def _engine_with_metrics(capture: Any) -> tuple[Any, Any]:
    from tracefleet.agent import metrics
    from tracefleet.agent.capture.engine import Filters

    # a private engine (options given): its consumer is the one this test breaks
    cap = capture(["file"], None, Filters(comms=("cold_rodata",)), hold_seconds=3600)
    server = metrics.serve(cap.engine, "node-t", "127.0.0.1:0", bpf_stats=False)
    return cap, server


def test_consumer_survives_a_housekeeping_error_and_stays_healthy(capture, workloads):
    cap, server = _engine_with_metrics(capture)
    try:
        raised = _fail_once(cap.engine, RuntimeError("injected detach_idle failure"))
        assert raised.wait(DEADLINE)
        w = json.loads(
            subprocess.run(
                [str(WORKLOADS / "cold_rodata"), "openat"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        addr = w["calls"][0]["addr"]
        # still consuming after the contained error
        wait_until(lambda: [e for e in list(cap.events)
                            if e["args"].get("pathname", {}).get("addr") == addr],
                   DEADLINE, "the workload's openat")  # fmt: skip
        assert cap.engine.errors.snapshot() == {("all", "housekeeping"): 1}
        status, body = _get(server.port, "/healthz")
        assert status == 200, body
        metrics_text = _get(server.port, "/metrics")[1]
        assert ('tracefleet_agent_record_errors_total{cause="housekeeping",event_set="all",'
                'node="node-t"} 1.0') in metrics_text  # fmt: skip
    finally:
        server.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_turns_503_when_the_consumer_thread_dies(capture, workloads):
    cap, server = _engine_with_metrics(capture)
    try:
        status, body = _get(server.port, "/healthz")
        assert status == 200 and body.startswith("ok:"), body
        _fail_once(cap.engine, _Killed("injected"))
        thread = cap.engine.ring._thread
        wait_until(lambda: not thread.is_alive(), DEADLINE, "the consumer thread to end")
        status, body = _get(server.port, "/healthz")
        assert status == 503, body
        assert "consumer thread has exited (_Killed: injected)" in body
        status, body = _get(server.port, "/readyz")
        assert status == 503, body
    finally:
        server.close()


def test_failing_sink_is_contained_counted_and_logged_once(capture, workloads, caplog):
    """A sink that raises on every event: every event still reaches the other sink, each
    failure is counted under cause=sink, and the log has one line for all of them."""
    import logging

    from tracefleet.agent.capture.engine import Filters

    caplog.set_level(logging.ERROR, logger="tracefleet.agent")
    cap = capture(["file"], None, Filters(comms=("cold_rodata",)), hold_seconds=3600)

    def broken_sink(ev: dict[str, Any]) -> None:
        raise KeyError("injected sink failure")

    cap.engine.add_sink(broken_sink)  # after cap.sink: it sees every event first
    for _ in range(3):
        w = json.loads(
            subprocess.run(
                [str(WORKLOADS / "cold_rodata"), "openat"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        addr = w["calls"][0]["addr"]
        wait_until(lambda addr=addr, pid=w["pid"]: [
                       e for e in list(cap.events)
                       if e["args"].get("pathname", {}).get("addr") == addr and e["pid"] == pid],
                   DEADLINE, "the workload's openat")  # fmt: skip
    # each delivered event failed once in the broken sink (the consumer may be one behind)
    wait_until(lambda: cap.engine.errors.snapshot() == {("file", "sink"): len(cap.events)},
               DEADLINE, "one counted sink failure per event")  # fmt: skip
    assert len(cap.events) >= 3
    lines = [r for r in caplog.records if "contained sink error" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.ERROR)


def test_health_turns_503_when_the_consumer_stalls(capture, workloads):
    """The consumer stuck (here: its poll blocks) makes /healthz 503 once its heartbeat is
    older than stale_seconds; it recovers when the consumer does."""
    from tracefleet.agent import metrics
    from tracefleet.agent.capture.engine import Filters

    cap = capture(["file"], None, Filters(comms=("cold_rodata",)), hold_seconds=3600,
                  stale_seconds=1.0)  # fmt: skip
    server = metrics.serve(cap.engine, "node-t", "127.0.0.1:0", bpf_stats=False)
    unblock = threading.Event()
    blocked = threading.Event()
    real = cap.engine.ring.poll_once

    def stuck_poll(*a: Any, **kw: Any) -> Any:
        if not unblock.is_set():
            blocked.set()
            unblock.wait(DEADLINE)
        return real(*a, **kw)

    try:
        cap.engine.ring.poll_once = stuck_poll
        assert blocked.wait(DEADLINE)
        _, body = wait_until(
            lambda: (r := _get(server.port, "/healthz"))[0] == 503 and r,
            DEADLINE, "/healthz to turn 503",
        )  # fmt: skip
        assert "consumer stalled" in body, body
        unblock.set()
        wait_until(lambda: _get(server.port, "/healthz")[0] == 200, DEADLINE, "recovery")
    finally:
        unblock.set()
        server.close()


def test_unusable_records_are_counted_as_decode_errors_not_delivered(capture):
    """Records no kernel object of ours writes (too short for a header; an unknown kind),
    handed to the real engine's record handler: counted under cause=decode, not delivered,
    and the next good record is handled as usual."""

    from tracefleet.agent.capture.decode import encode_record
    from tracefleet.agent.capture.engine import Filters
    from tracefleet.agent.kernel.abi import TfEvent, TfHdr

    cap = capture(["file"], None, Filters(comms=("tf-no-such-comm",)), hold_seconds=3600)
    eng = cap.engine
    # only our records: the consumer thread polls nothing (and does not spin)
    eng.ring.poll_once = lambda *a, **kw: time.sleep(0.02) or 0  # type: ignore[method-assign]
    before = {n: sa.delivered for n, sa in eng.totals().items()}
    hdr = TfHdr(ts_ns=1, pid=1, tid=1, kind=99, syscall=1, event_set=0)
    eng.ring.on_record(b"\x01" * 7)
    eng.ring.on_record(bytes(hdr) + b"\0" * 64)
    good = TfEvent()
    good.hdr = hdr
    good.hdr.kind = 1
    eng.ring.on_record(encode_record(good))  # a well-formed openat record (records vary in length)
    assert eng.errors.snapshot() == {("unknown", "decode"): 1, ("file", "decode"): 1}
    assert eng.totals()["file"].delivered - before.get("file", 0) == 1
    assert [e["syscall"] for e in cap.events[-1:]] == ["openat"]
