"""--pid P --follow on the real kernel: the descendants of P are followed in the kernel
(bpf/follow.bpf.c on sched_process_fork/exit), including those born after the rule was set,
threads, and children that exec; an unrelated tree of the same program is not."""

from __future__ import annotations

import ctypes
import json
import secrets
import subprocess
from typing import Any

import pytest

from tests.conftest import BPF_DIR, WORKLOADS, scaled, wait_until
from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
from tracefleet.agent.capture.engine import EventSetConfig, Filters
from tracefleet.agent.kernel import libbpf

pytestmark = pytest.mark.bpf


def start_tree(tag: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    p = subprocess.Popen([str(WORKLOADS / "proc_tree"), "--tag", tag], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None
    return p, json.loads(p.stdout.readline())


def finish_tree(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = p.communicate("go\n", timeout=scaled(30))
    assert p.returncode == 0
    return json.loads(out)


def test_follow_three_generations_with_exec(host: None) -> None:
    events: list[dict[str, Any]] = []

    def sink(ev: dict[str, Any]) -> None:
        path = ev["args"].get("pathname", {}).get("value")
        if isinstance(path, str) and "/tf-nonexistent-dir/tfollow-" in path:
            events.append(ev)

    tag, other_tag = f"tfollow-{secrets.token_hex(4)}", f"tfollow-{secrets.token_hex(4)}"
    eng = BpfEngine(EngineOptions(bpf_dir=BPF_DIR, sets=("file",)))
    p, hello = start_tree(tag)
    other, _ = start_tree(other_tag)
    try:
        eng.add_sink(sink)
        follow = Filters(pids=(hello["pid"],), follow=True)
        st = eng.apply({"file": EventSetConfig("file", True, follow)})
        assert not st[0].error, st[0].error
        eng.start()
        finish_tree(other)  # not followed: none of its calls may pass
        report = finish_tree(p)
        procs, prefix = report["procs"], report["prefix"]
        assert set(procs) == {"g0", "g1-early", "g1", "g1-thread", "g2-exec", "g2", "g3",
                              "g3-exec"}  # fmt: skip

        def seen() -> dict[str, dict[str, Any]]:
            paths = ((e["args"]["pathname"]["value"], e) for e in list(events))
            return {v.removeprefix(prefix): e for v, e in paths if v.startswith(prefix)}

        got = wait_until(lambda: (s := seen()) and set(s) == set(procs) and s, scaled(30),
                         f"an event from every process of the tree {procs}")  # fmt: skip
        for name, (pid, ppid) in procs.items():
            assert (got[name]["pid"], got[name]["ppid"]) == (pid, ppid), name
        assert got["g3-exec"]["comm"] == "cat"  # after its exec: still followed
        # the other tree finished before this one started its calls: its events, had they
        # passed, would be in the ring before these
        assert [e for e in events if other_tag in e["args"]["pathname"]["value"]] == []

        # every process of the tree has exited: the kernel dropped them from the map
        left = set(libbpf.map_keys(eng.shared.follow, ctypes.c_uint32))
        assert left & {pid for pid, _ in procs.values()} == set()
        assert eng.follow_full() == 0
    finally:
        for proc in (p, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        eng.close()
