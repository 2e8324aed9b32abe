"""`capture` starts without importing what only other commands use: the modules its start-up
imports (the CLI, the engine and its consumer, the jsonl formatter) pull in no HTTPS client,
gRPC, protobuf or Prometheus library (tens of ms each; issue 14's 2 s to ready)."""

from __future__ import annotations

import json
import subprocess
import sys

CAPTURE_MODULES = (
    "tracefleet.agent.cli",
    "tracefleet.agent.capture.bpfengine",
    "tracefleet.agent.capture.jsonfmt",
)
# top-level packages that only the pod watcher, `run` (controller link), the exporters or
# /metrics need
NOT_FOR_CAPTURE = ("http", "ssl", "email", "grpc", "google", "prometheus_client", "urllib3")


def test_capture_imports_no_network_or_rpc_library():
    code = (
        f"import importlib, json, sys\n"
        f"for m in {CAPTURE_MODULES!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    loaded = json.loads(out.stdout)
    heavy = sorted(m for m in loaded if m.split(".")[0] in NOT_FOR_CAPTURE)
    assert not heavy, f"capture's start-up imports {heavy}"
    assert "tracefleet.agent.capture.workload" in loaded  # the check saw capture's imports
