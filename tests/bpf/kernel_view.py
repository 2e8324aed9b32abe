"""The kernel's own view of what tracefleet attached, through bpftool and /proc (not the
agent)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any


def bpftool(*args: str) -> Any:
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "null")


def linked_prog_ids() -> set[int]:
    """Program ids that have a live BPF link (tracepoint programs attach through one)."""
    return {int(link["prog_id"]) for link in bpftool("link", "show") or []}


def fd_bpf_ids(pid: int) -> tuple[set[int], set[int], set[int]]:
    """(program ids, link ids, map ids) of the BPF fds process ``pid`` holds, from
    /proc/PID/fdinfo."""
    progs: set[int] = set()
    links: set[int] = set()
    maps: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "link_id" in fields:
            links.add(int(fields["link_id"]))
            if "prog_id" in fields:
                progs.add(int(fields["prog_id"]))
        elif "prog_id" in fields:
            progs.add(int(fields["prog_id"]))
        elif "map_id" in fields:
            maps.add(int(fields["map_id"]))
    return progs, links, maps


def _named(map_ids: Any, name: str) -> int | None:
    for mid in map_ids:
        if bpftool("map", "show", "id", str(mid)).get("name") == name:
            return int(mid)
    return None


def map_id_by_name(prog_id: int, name: str) -> int:
    """The map called ``name`` that program ``prog_id`` uses."""
    mid = _named(bpftool("prog", "show", "id", str(prog_id)).get("map_ids", []), name)
    if mid is None:
        raise LookupError(f"program {prog_id} uses no map named {name}")
    return mid


def process_map_id(pid: int, name: str) -> int:
    """The map called ``name`` among the map fds process ``pid`` holds."""
    mid = _named(fd_bpf_ids(pid)[2], name)
    if mid is None:
        raise LookupError(f"process {pid} holds no {name} map")
    return mid


def u64(value: list[str]) -> int:
    """The first 8 bytes of a bpftool hex byte list, as a little-endian integer."""
    return int.from_bytes(bytes(int(b, 16) for b in value[:8]), "little")


def control_bits(map_id: int) -> int:
    """tf_control.enabled_bits of map ``map_id`` as the kernel holds it."""
    return u64(bpftool("map", "lookup", "id", str(map_id), "key", "0", "0", "0", "0")["value"])


def enabled_bits(prog_id: int) -> int:
    """The enable bits of the tf_control map program ``prog_id`` tests."""
    return control_bits(map_id_by_name(prog_id, "tf_control"))


def process_enabled_bits(pid: int) -> int:
    """The enable bits of the tf_control map agent process ``pid`` holds."""
    return control_bits(process_map_id(pid, "tf_control"))
