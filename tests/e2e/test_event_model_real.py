"""One workload, captured both ways by real agents on this kernel: a local `capture -o
jsonl` and a controller + `tracefleet-agent run` read with `tracefleet events -o json`. The
two give the same typed event field by field (the timing fields differ: two agents, two
probes; both wall-clock times fall inside the test's own clock readings around the call).
The workload sets an ANSI-escape comm and opens an ESC/BEL/CR/LF path: JSON keeps it
exact, every table prints it escaped (the controller's like strace, after a time column).
Its open of an unmapped address is a lost argument: a status and an error, no value."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import pytest

from tests.conftest import BPF_DIR, WORKLOADS, require_root, wait_until
from tests.e2e.fleet_helpers import ControllerProc, nodes_by_name, status
from tests.ports import free_port
from tracefleet.model import human

pytestmark = [pytest.mark.e2e, pytest.mark.bpf]
AGENT = [sys.executable, "-m", "tracefleet.agent"]
CLI = [sys.executable, "-m", "tracefleet.controller.operator.cli"]
SCALE = 10 if os.environ.get("TRACEFLEET_IN_VM") else 1
EVIL_COMM = "tf\x1b[31mevil"
EVIL_NAME = "\x1b[2J\x1b]0;pwned\x07\r\nname"
# fields that two agents measure each with its own probe
TIMING = {"ts_ns", "time", "time_ns", "duration_ns", "delivery_latency_ns", "node"}


def _lines(stream: TextIO, q: queue.Queue[str]) -> None:
    for line in stream:
        q.put(line)


class Reader:
    """Lines of a child's stdout, read by a thread (so waits are on a queue, not a pipe)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.lines: list[str] = []
        assert proc.stdout is not None
        threading.Thread(target=_lines, args=(proc.stdout, self.q), daemon=True).start()

    def drain(self, timeout: float = 0.0) -> list[str]:
        try:
            self.lines.append(self.q.get(timeout=timeout) if timeout else self.q.get_nowait())
            while True:
                self.lines.append(self.q.get_nowait())
        except queue.Empty:
            pass
        return self.lines


def _events(lines: list[str], pid: int) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        if line.startswith("{"):
            ev = json.loads(line)
            if ev["pid"] == pid:
                out.append(ev)
    return out


def _iteration(events: list[dict[str, Any]], n: int, port: int) -> dict[str, dict[str, Any]]:
    """The openat, connect and EFAULT openat ("lost") of workload iteration n."""
    found: dict[str, dict[str, Any]] = {}
    # in entry order: each event set has its own ring, so delivery interleaves sets by ring
    events = sorted(events, key=lambda e: e["ts_ns"])
    for i, ev in enumerate(events):
        path = (ev["args"].get("pathname") or {}).get("value") or ""
        if ev["syscall"] == "openat" and path.endswith(f"{EVIL_NAME}-{n}"):
            found["openat"] = ev
            for nxt in events[i + 1 :]:
                addr = (nxt["args"].get("addr") or {}).get("value") or {}
                if nxt["syscall"] == "connect" and addr.get("port") == port:
                    found["connect"] = nxt
                if "connect" in found and nxt["syscall"] == "openat":
                    if nxt["ret"] == -errno.EFAULT:
                        found["lost"] = nxt
                    break
    return found


def _untimed(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k not in TIMING}


def _stop(p: subprocess.Popen[Any]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=30 * SCALE)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_local_jsonl_and_controller_stream_give_the_same_typed_event(tmp_path: Path):
    require_root()
    wl_bin = WORKLOADS / "hostile_names"
    if not (BPF_DIR / "file.bpf.o").exists() or not wl_bin.exists():
        pytest.skip("run `make bpf workloads` first")
    port = free_port()  # nothing listens: connect is refused, the sockaddr is what counts
    procs: list[subprocess.Popen[Any]] = []
    ctl = ControllerProc(tmp_path, stale_after=5).start()
    try:
        wl = subprocess.Popen([str(wl_bin), str(tmp_path), str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(wl)
        assert wl.stdout is not None and wl.stdin is not None
        pid = int(wl.stdout.readline().split()[1])
        wl_out = Reader(wl)

        # two local captures (jsonl and table) and one agent under the controller
        local: dict[str, subprocess.Popen[str]] = {}
        readers: dict[str, Reader] = {}
        for fmt in ("jsonl", "table"):
            ready = tmp_path / f"ready-{fmt}"
            local[fmt] = subprocess.Popen(
                [*AGENT, "capture", "-e", "file,net,exec", "--pid", str(pid), "-o", fmt,
                 "--ready-file", str(ready), "--metrics-listen", "off"],
                stdout=subprocess.PIPE, stderr=open(tmp_path / f"{fmt}.err", "w"),  # noqa: SIM115
                text=True,
            )  # fmt: skip
            procs.append(local[fmt])
            readers[fmt] = Reader(local[fmt])
        agent = subprocess.Popen(
            [*AGENT, "run", "--controller", ctl.address, "--node", "typed-1",
             "--labels", "role=typed", "--metrics-listen", "off"],
            stdout=open(tmp_path / "agent.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )  # fmt: skip
        procs.append(agent)
        for fmt in local:
            wait_until(
                lambda fmt=fmt: (
                    (tmp_path / f"ready-{fmt}").exists() or local[fmt].poll() is not None
                ),
                120 * SCALE,
                f"local {fmt} capture",
            )
            assert local[fmt].poll() is None, (tmp_path / f"{fmt}.err").read_text()
        wait_until(
            lambda: (
                nodes_by_name(status(ctl.address)).get("typed-1", {}).get("state") == "connected"
            ),
            120 * SCALE,
            "real agent registered",
        )
        for s in ("file", "net", "exec"):
            r = subprocess.run([*CLI, "--controller", ctl.address, "enable", s, "--pid",
                                str(pid), "--wait"], capture_output=True, text=True)  # fmt: skip
            assert r.returncode == 0, r.stderr
        events_cli = subprocess.Popen(
            [*CLI, "--controller", ctl.address, "events", "--follow", "--pid", str(pid),
             "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        procs.append(events_cli)
        remote = Reader(events_cli)
        table_cli = subprocess.Popen(
            [*CLI, "--controller", ctl.address, "events", "--follow", "--pid", str(pid),
             "-o", "table"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        procs.append(table_cli)
        remote_table = Reader(table_cli)

        # one iteration after another until the controller's stream has one whole (the
        # agents sample only once the follower's wish reached them)
        deadline = time.monotonic() + 120 * SCALE
        n = 0
        seen: dict[str, dict[str, Any]] = {}
        brackets: dict[int, tuple[int, int]] = {}
        while not seen:
            assert time.monotonic() < deadline, "no whole iteration in tracefleet events"
            n += 1
            before = time.time_ns()
            wl.stdin.write("go\n")
            wl.stdin.flush()
            while not any(line == f"done {n}\n" for line in wl_out.drain(5 * SCALE)):
                assert wl.poll() is None, "workload died"
            brackets[n] = (before, time.time_ns())
            remote_evs = _events(remote.drain(2 * SCALE), pid)  # every line so far
            # the newest iteration the stream has whole: the latest one's sets may still be
            # on their way (each set has its own ring, delivered in its own batches)
            for m in range(n, 0, -1):
                got = _iteration(remote_evs, m, port)
                if len(got) == 3:
                    seen, n = got, m
                    break
        wl.stdin.close()  # the workload re-executes itself: execve with a hostile argv
        assert wl.wait(timeout=30 * SCALE) == 0

        def execve(lines: list[str]) -> dict[str, Any] | None:
            return next((e for e in _events(lines, pid) if e["syscall"] == "execve"), None)

        remote_exec = wait_until(lambda: execve(remote.drain(0.5)), 60 * SCALE, "remote execve")
        local_lines = wait_until(
            lambda: (lines := readers["jsonl"].drain(0.5)) and execve(lines) and lines,
            60 * SCALE,
            "local execve",
        )
        local_it = _iteration(_events(local_lines, pid), n, port)
        assert set(local_it) == {"openat", "connect", "lost"}

        for name in ("openat", "connect", "lost"):
            lo, re_ = local_it[name], seen[name]
            assert _untimed(lo) == _untimed(re_), name
            assert re_["node"] == "typed-1"
            lo_t, hi_t = brackets[n]
            for ev in (lo, re_):  # wall clock: inside the test's own readings
                assert lo_t <= ev["time_ns"] <= hi_t, (name, lo_t, ev["time_ns"], hi_t)
                assert 0 < ev["duration_ns"] <= hi_t - lo_t
                # the readable time is the same instant (UTC, microseconds)
                t = dt.datetime.fromisoformat(ev["time"].replace("Z", "+00:00"))
                assert t.tzinfo is not None and t.utcoffset() == dt.timedelta(0), ev["time"]
                assert int(t.timestamp() * 1e6) == ev["time_ns"] // 1000, ev["time"]
        local_exec = execve(local_lines)
        assert local_exec is not None
        assert _untimed(local_exec) == _untimed(remote_exec)

        # the typed API, as a client sees it
        op, conn = seen["openat"], seen["connect"]
        assert op["comm"] == EVIL_COMM  # JSON: exact
        assert op["args"]["pathname"]["value"] == f"{tmp_path}/{EVIL_NAME}-{n}"
        assert op["args"]["flags"]["names"] == ["O_RDONLY", "O_CLOEXEC"]
        assert op["args"]["dfd"]["value"] == -100 and op["ret"] == -2
        assert conn["args"]["addr"]["value"] == {"family": "inet", "address": "127.0.0.1",
                                                 "port": port}  # fmt: skip
        # a lost argument: explicit status and cause, and a null value (nothing invented)
        lost = seen["lost"]["args"]["pathname"]
        assert "value" in lost and lost["value"] is None, lost
        assert lost["status"] == "lost" and lost["error"] == "EFAULT", lost
        assert lost["addr"] == "0x8", lost
        assert remote_exec["args"]["argv"]["value"] == ["hostile_names", "a b\x1b[1m", "--exit"]
        assert remote_exec["uid"] == os.getuid() and remote_exec["ppid"] == os.getpid()
        # the executable: the workload binary's real path, in every event, both ways (the
        # local events equal the remote ones field by field above)
        exe = str(wl_bin.resolve())
        for ev in (op, conn, seen["lost"], remote_exec, local_it["openat"], local_exec):
            assert ev["exe"] == exe, ev

        # tables: strace-like and escaped
        table_lines = wait_until(
            lambda: (ls := readers["table"].drain(0.5)) and any("execve(" in x for x in ls) and ls,
            60 * SCALE,
            "table execve",
        )
        text = "".join(table_lines)
        assert not any(c in text for c in "\x1b\x07\r"), "a control character reached the table"
        assert "tf\\x1b[31mevil" in text
        escaped = f"{tmp_path}/\\x1b[2J\\x1b]0;pwned\\x07\\r\\nname-{n}"
        assert f'openat(AT_FDCWD, "{escaped}", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such' in text
        assert '["hostile_names", "a b\\x1b[1m", "--exit"]' in text
        # the controller's table: a UTC time column, the node, then the call as strace
        # prints it; the time is the event's own
        rows = wait_until(
            lambda: (ls := remote_table.drain(0.5)) and any("EFAULT" in x for x in ls) and ls,
            60 * SCALE,
            "controller table",
        )
        assert rows[0].split()[:2] == ["TIME", "(UTC)"], rows[0]
        for name, call in (
            ("openat", f'openat(AT_FDCWD, "{escaped}", O_RDONLY|O_CLOEXEC) = -1 ENOENT ('),
            ("lost", "openat(AT_FDCWD, <lost EFAULT>, O_RDONLY|O_CLOEXEC) = -1 EFAULT ("),
        ):
            clock = human.clock_text(seen[name]["time_ns"])
            row = next((r for r in rows if r.startswith(clock) and call in r), None)
            assert row is not None, (name, clock, call, rows)
            # TIME NODE [NAMESPACE POD CONTAINER: this agent attributes, a host process
            # shows "- (host) -"] PID COMM (escaped) CALL
            assert re.match(
                rf"{re.escape(clock)} typed-1 +- +\(host\) +- +{pid} tf\\x1b\[31mevil +", row
            ), row
            assert not any(c in row for c in "\x1b\x07\r"), row
        cmd = [*CLI, "--controller", ctl.address, "events", "--pid", str(pid), "--count", "1"]
        r = subprocess.run([*cmd, "--duration", "1s"], capture_output=True, text=True)
        assert "\x1b" not in r.stdout + r.stderr
    finally:
        for p in reversed(procs):
            _stop(p)
        ctl.stop()
