"""tracefleet-agent as a user runs it: probe, capture (jsonl and table), and refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BPF_DIR, WORKLOADS, scaled, wait_until

pytestmark = pytest.mark.bpf
AGENT = [sys.executable, "-m", "tracefleet.agent"]


SLOW = 10 if os.environ.get("TRACEFLEET_IN_VM") else 1  # the emulated guest


def _probe(*args: str) -> dict:
    out = subprocess.run([*AGENT, "probe", "-o", "json", *args], capture_output=True,
                         text=True, timeout=300 * SLOW)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _rungs(name: str) -> tuple[str, ...]:
    return ("fentry", "tracepoint") if name == "vfs" else (
        "sleepable", "fentry-sleepable", "exit-retry", "nofault")  # fmt: skip


def test_probe_reports_kernel_features_and_strategy_per_set(host):
    """`probe` plans each set from the feature probes without loading it; `probe --load`
    loads every set for real, and the real ladder lands on the rung the probes planned."""
    planned, loaded = _probe(), _probe("--load")
    for report in (planned, loaded):
        assert report["kernel"] == os.uname().release
        assert report["features"]["btf"] is True
        assert set(report["event_sets"]) >= {"file", "exec", "net", "vfs"}
        assert report["features"]["probes"]["tracepoint"]["ok"], report["features"]["probes"]
    for name, s in planned["event_sets"].items():
        real = loaded["event_sets"][name]
        assert (s["loaded"], real["loaded"]) == (False, True), name
        assert s["strategy"] in _rungs(name), name
        assert real["strategy"] == s["strategy"], (name, s["attempts"], real["attempts"])
        for rep, ok_reason in ((s, "probe passed"), (real, "loaded and attached")):
            last = rep["attempts"][-1]
            assert (last["strategy"], last["ok"]) == (rep["strategy"], True)
            assert last["reason"].startswith(ok_reason), last
            # every better rung that was refused says why, in the kernel's words: not
            # libbpf's "failed to load object" nor its memlock guess
            for a in rep["attempts"][:-1]:
                assert not a["ok"] and a["reason"]
                assert a["strategy"] in rep["reason"]
                assert "failed to load object" not in a["reason"], a
                assert "ulimit" not in a["reason"], a


def test_probe_loads_nothing_and_a_set_loads_when_first_enabled(host):
    """The probe report and the Register message come from the feature probes: no event set
    is loaded (verified) until it is enabled, and then only that one."""
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.capture.engine import EventSetConfig
    from tracefleet.agent.control.client import ControlClient

    with BpfEngine(EngineOptions(bpf_dir=BPF_DIR)) as eng:
        caps = eng.capabilities()
        reg = ControlClient(eng, "127.0.0.1:1", "n1")._register_message()
        assert {s.name: s.strategy for s in eng.statuses()} == dict.fromkeys(caps["event_sets"],
                                                                            "none")  # fmt: skip
        # Register carries the planned rung of every set
        assert {c.event_set: c.strategy for c in reg.capabilities} == {
            n: s["strategy"] for n, s in caps["event_sets"].items()
        }
        assert all(c.strategy for c in reg.capabilities)
        eng.apply({"file": EventSetConfig("file", True)})
        by = {s.name: s for s in eng.statuses()}
        assert by["file"].enabled and by["file"].attached, by["file"]
        assert by["file"].strategy.split("+")[0] == caps["event_sets"]["file"]["strategy"]
        assert {n for n, s in by.items() if s.strategy != "none"} == {"file"}


def test_probe_table_names_each_set_rung_and_refusal(host):
    """On a terminal `probe` prints a table: each set with its rung, each refused better
    rung with the kernel's words, and every feature probe."""
    report = _probe()
    out = subprocess.run([*AGENT, "probe", "-o", "table"], capture_output=True, text=True,
                         timeout=300 * SLOW)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name, s in report["event_sets"].items():
        [row] = [ln for ln in lines if ln.split()[:1] == [name]]
        assert row.split()[1] == s["strategy"], row
        for a in s["attempts"][:-1]:
            assert any(a["strategy"] in ln and a["reason"] in ln for ln in lines), a
    for feat, p in report["features"]["probes"].items():
        assert any(ln.split()[:2] == [feat, "yes" if p["ok"] else "NO"] for ln in lines), feat


def _release() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def test_sleepable_is_chosen_where_the_kernel_has_sleepable_tracepoints(host):
    """On Linux 7.2+ every event set must run the best rung; elsewhere the report must say
    why it did not (the kernel's refusal of a sleepable tracepoint program)."""
    out = subprocess.run([*AGENT, "probe"], capture_output=True, text=True,
                         timeout=300 * SLOW)  # fmt: skip
    report = json.loads(out.stdout)
    chosen = {name: s["strategy"] for name, s in report["event_sets"].items()}
    # vfs's rungs are hooks, not ways to read user memory: on 7.2 trampolines load too
    if _release() >= (7, 2):
        assert chosen == {"file": "sleepable", "exec": "sleepable", "net": "sleepable",
                          "vfs": "fentry"}  # fmt: skip
        assert report["features"]["sleepable_tracepoints"] is True
    else:
        assert "sleepable" not in chosen.values()
        for name, s in report["event_sets"].items():
            first = "fentry" if name == "vfs" else "sleepable"
            assert s["attempts"][0]["strategy"] == first and not s["attempts"][0]["ok"]


def test_capture_jsonl_has_the_documented_fields(host, workloads, tmp_path: Path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [*AGENT, "capture", "-e", "file", "--comm", "cold_rodata", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # until ready (loading takes a minute under emulation), then Ctrl-C once the workload
        # is done: the agent drains what its syscalls left in the ring
        wait_until(lambda: ready.exists() or proc.poll() is not None, scaled(60), "ready")
        assert proc.poll() is None, proc.communicate()[1]
        run = subprocess.run([str(WORKLOADS / "cold_rodata"), "openat"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        w = json.loads(run.stdout)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=scaled(60))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events and all(e["comm"] == "cold_rodata" for e in events)
    [ev] = [e for e in events if e["args"]["pathname"]["addr"] == w["calls"][0]["addr"]]
    for key in ("ts_ns", "event_set", "syscall", "pid", "tid", "comm", "ret", "args"):
        assert key in ev
    assert ev["pid"] == w["pid"] and ev["syscall"] == "openat" and ev["ret"] == -2
    arg = ev["args"]["pathname"]
    assert arg["value"] == w["calls"][0]["expect"]
    assert arg["status"] in ("ok", "recovered")
    assert "summary" in err and "file: events=" in err


def test_capture_refuses_unprivileged_user_with_cause_and_fix(host):
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         *AGENT, "capture", "-e", "file", "--duration", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": "/nonexistent"},
    )  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "missing privileges" in out.stderr and "fix:" in out.stderr


def _scrape(port: int) -> dict[str, float]:
    """Sample name with labels -> value, from the agent's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {k: float(v) for k, _, v in (ln.rpartition(" ") for ln in text.splitlines())
            if k and not k.startswith("#")}  # fmt: skip


@pytest.mark.parametrize("flag", [False, True])
def test_bpf_run_time_stats_only_with_the_flag(host, tmp_path: Path, flag: bool):
    """Serving metrics leaves the kernel's host-wide BPF statistics off unless --bpf-stats
    asks; with it, the kernel counts the runs of tracefleet's programs."""
    from tests.ports import free_port

    port, ready = free_port(), tmp_path / "ready"
    proc = subprocess.Popen(
        [*AGENT, "capture", "-e", "file", "--duration", str(120 * SLOW), "--comm", "tf-none",
         "--metrics-listen", f"127.0.0.1:{port}", "--ready-file", str(ready),
         *(["--bpf-stats"] if flag else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, 120 * SLOW, "capture ready")
        assert proc.poll() is None, proc.communicate()[1]
        m = _scrape(port)
        [gauge] = [v for k, v in m.items() if k.startswith("tracefleet_agent_bpf_stats_enabled")]
        assert gauge == (1.0 if flag else 0.0)
        if flag:  # the kernel counts runs of the exit program of openat (any process's)

            def runs() -> float:
                (tmp_path / "touch").write_text("")  # an openat
                return sum(v for k, v in _scrape(port).items()
                           if k.startswith("tracefleet_agent_bpf_program_runs_total")
                           and 'program="tp_exit_openat"' in k)  # fmt: skip

            assert wait_until(runs, 60 * SLOW, "kernel-counted runs of tp_exit_openat")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120 * SLOW)
