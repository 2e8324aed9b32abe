"""A full ring buffer drops records, and every drop is counted in the kernel, per event
set: events + drops equals the syscalls made, exactly."""

from __future__ import annotations

import subprocess
import time

import pytest

from tracefleet.agent.capture.engine import EventSetConfig, Filters

pytestmark = pytest.mark.bpf

OPENS = 3000


def test_overflow_is_counted_exactly(host):
    from tests.conftest import BPF_DIR, scaled
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions

    # 64 KiB holds ~330 records of ~200 bytes (header + path); nobody consumes until the
    # loop is done
    eng = BpfEngine(EngineOptions(bpf_dir=BPF_DIR, ring_bytes=64 << 10, wakeup_bytes=1 << 30))
    try:
        delivered: list[dict] = []
        eng.add_sink(delivered.append)
        proc = subprocess.Popen(
            ["sh", "-c", f"read go; i=0; while [ $i -lt {OPENS} ]; do : < /etc/hostname; "
             "i=$((i+1)); done"],
            stdin=subprocess.PIPE, text=True,
        )  # fmt: skip
        eng.apply({"file": EventSetConfig("file", True, Filters(pids=(proc.pid,)))})
        proc.communicate("go\n", timeout=scaled(60))
        time.sleep(0.1)
        k = eng.kernel_counters("file")
        assert k["dropped"] > 0, k
        assert k["events"] + k["dropped"] == OPENS, k
        while eng.drain():
            pass
        mine = [e for e in delivered if e["pid"] == proc.pid]
        assert len(mine) == k["events"]
        agg = eng.collect()
        assert agg.sets["file"].dropped == k["dropped"]
        assert agg.sets["file"].delivered == k["events"]
    finally:
        eng.close()
