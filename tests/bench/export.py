"""Exporter throughput: events/s each exporter writes, fed as fast as offer() allows, on
one core (this process pinned to CPU 0), and the CPU it costs per event.

    .venv/bin/python tests/bench/export.py [--events N]

A real openat event (the capture -o jsonl shape) is offered N times with a queue large
enough to hold them all, so nothing is dropped; the clock runs from the first offer to the
last event written (file) or acknowledged by a local OTLP receiver (opentelemetry-proto
gRPC service, in this process: its CPU is counted too). `run.py` runs it as its export
section (``measure_all``).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from concurrent import futures
from typing import Any

EVENT: dict[str, Any] = {
    "ts_ns": 1, "time_ns": 1_764_000_000_000_000_000, "duration_ns": 2500,
    "delivery_latency_ns": 40_000, "event_set": "file", "syscall": "openat", "pid": 4242,
    "tid": 4242, "ppid": 1, "uid": 0, "gid": 0, "comm": "bench", "ret": -2,
    "cgroup_id": 1234, "strategy": "exit-retry",
    "args": {
        "dfd": {"value": -100, "status": "ok", "strategy": "exit-retry"},
        "pathname": {"value": "/var/lib/postgresql/16/main/base/16384/2619_fsm",
                     "status": "ok", "strategy": "exit-retry", "addr": "0x7ffd5e1c2a10"},
        "flags": {"value": 524288, "status": "ok", "strategy": "exit-retry",
                  "names": ["O_RDONLY", "O_CLOEXEC"]},
        "mode": {"value": 0, "status": "ok", "strategy": "exit-retry"},
    },
}  # fmt: skip


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(exp: Any, n: int) -> tuple[float, float, dict[str, Any]]:
    exp.start()
    t0, c0 = time.monotonic(), _cpu()
    for i in range(n):
        exp.offer({**EVENT, "ts_ns": i})
    while exp.snapshot()["written"] + sum(exp.snapshot()["undeliverable"].values()) < n:
        time.sleep(0.005)
    wall, cpu = time.monotonic() - t0, _cpu() - c0
    exp.close()
    return wall, cpu, exp.snapshot()


def measure_all(n: int) -> dict[str, Any]:
    """{"events": n, "exporters": {name: {...}}}: each exporter fed ``n`` events, this process
    pinned to one CPU (restored after)."""
    from tracefleet.agent import export

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    rows: list[tuple[str, float, float, dict[str, Any]]] = []
    skipped: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            spec = export.file_spec(f"{d}/bench.jsonl", "64M", keep=2, queue_size=n)
            rows.append(("file", *measure(export.FileExporter("file", spec), n)))
        try:
            import grpc
            from opentelemetry.proto.collector.logs.v1 import (
                logs_service_pb2,
                logs_service_pb2_grpc,
            )

            from tracefleet.agent.export.otlp import OtlpExporter
        except ImportError as e:
            skipped["otlp-grpc"] = str(e)
        else:

            class Sink(logs_service_pb2_grpc.LogsServiceServicer):
                def Export(self, request: Any, context: Any) -> Any:
                    return logs_service_pb2.ExportLogsServiceResponse()

            server = grpc.server(futures.ThreadPoolExecutor(2))
            logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Sink(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            try:
                exp = OtlpExporter("otlp", f"127.0.0.1:{port}", "grpc", queue_size=n)
                rows.append(("otlp-grpc", *measure(exp, n)))
            finally:
                server.stop(0)
    finally:
        os.sched_setaffinity(0, before)
    out: dict[str, Any] = {"events": n, "cpu": min(before), "exporters": {}, "skipped": skipped}
    for name, wall, cpu, snap in rows:
        out["exporters"][name] = {
            "written": snap["written"],
            "events_per_s": snap["written"] / wall if wall > 0 else 0.0,
            "cpu_us_per_event": cpu / n * 1e6,
            "undeliverable": sum(snap["undeliverable"].values()),
            "wall_s": wall,
        }
    return out


def render(r: dict[str, Any]) -> str:
    lines = [
        f"{r['events']} events offered per exporter as fast as offer() allows, queue large "
        f"enough for all (no drop by design), this process pinned to CPU {r['cpu']}; OTLP to a "
        "local receiver in this process (its CPU counted too)",
        f"{'exporter':<10} {'written':>8} {'events/s':>10} {'cpu us/event':>13} "
        f"{'undeliverable':>14}",
    ]
    for name, e in r["exporters"].items():
        lines.append(f"{name:<10} {e['written']:>8} {e['events_per_s']:>10.0f} "
                     f"{e['cpu_us_per_event']:>13.1f} {e['undeliverable']:>14}")  # fmt: skip
    for name, why in r.get("skipped", {}).items():
        lines.append(f"{name}: skipped ({why})")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    print(render(measure_all(ap.parse_args().events)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
