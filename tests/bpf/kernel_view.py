"""The kernel's own view of what tracefleet attached, through bpftool (not the agent)."""

from __future__ import annotations

import json
import subprocess
from typing import Any


def bpftool(*args: str) -> Any:
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "null")


def linked_prog_ids() -> set[int]:
    """Program ids that have a live BPF link (tracepoint programs attach through one)."""
    return {int(link["prog_id"]) for link in bpftool("link", "show") or []}


def map_id_by_name(prog_id: int, name: str) -> int:
    prog = bpftool("prog", "show", "id", str(prog_id))
    for mid in prog.get("map_ids", []):
        if bpftool("map", "show", "id", str(mid)).get("name") == name:
            return int(mid)
    raise LookupError(f"program {prog_id} uses no map named {name}")


def enabled_bits(prog_id: int) -> int:
    """tf_control.enabled_bits as the kernel holds it, read by bpftool."""
    mid = map_id_by_name(prog_id, "tf_control")
    entry = bpftool("map", "lookup", "id", str(mid), "key", "0", "0", "0", "0")
    raw = bytes(int(b, 16) for b in entry["value"][:8])
    return int.from_bytes(raw, "little")
