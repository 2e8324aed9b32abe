"""The agent's ctypes mirror of bpf/include/tracefleet/events.h matches the BTF that clang
emitted into each BPF object, field by field (name, offset, size), as Tetragon's
alignchecker does for its Go structs. A drift here would make the agent decode garbage."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tracefleet.agent.kernel import abi

REPO = Path(__file__).resolve().parents[2]
# the event sets' objects; probe.bpf.o (feature probes) shares no map, config or record
OBJECTS = sorted(p for p in (REPO / "build" / "bpf").glob("*.bpf.o") if p.name != "probe.bpf.o")


def btf_types(obj: Path) -> dict[int, dict[str, Any]]:
    if not shutil.which("bpftool"):
        pytest.skip("bpftool not installed (deploy/host/install-deps.sh installs it)")
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {t["id"]: t for t in json.loads(out)["types"]}


def type_size(types: dict[int, dict[str, Any]], tid: int) -> int:
    t = types[tid]
    kind = t["kind"]
    if kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT"):
        return type_size(types, t["type_id"])
    if kind == "ARRAY":
        return t["nr_elems"] * type_size(types, t["type_id"])
    if kind == "PTR":
        return 8
    return int(t["size"])


def structs_in(obj: Path) -> tuple[dict[int, dict[str, Any]], dict[str, dict[str, Any]]]:
    types = btf_types(obj)
    return types, {t["name"]: t for t in types.values() if t["kind"] == "STRUCT" and t["name"]}


@pytest.fixture(scope="module")
def objects() -> list[Path]:
    if not OBJECTS:
        pytest.skip("BPF objects not built: run `make bpf`")
    return OBJECTS


@pytest.mark.parametrize("cname", sorted(abi.MIRRORS))
def test_struct_matches_btf(objects: list[Path], cname: str) -> None:
    mirror = abi.MIRRORS[cname]
    seen_in = 0
    for obj in objects:
        types, structs = structs_in(obj)
        if cname not in structs:
            continue
        seen_in += 1
        st = structs[cname]
        assert st["size"] == ctypes.sizeof(mirror), f"{obj.name}: sizeof({cname})"
        btf_fields = [(m["name"], m["bits_offset"] // 8, type_size(types, m["type_id"]))
                      for m in st["members"]]  # fmt: skip
        py_fields = [(name, getattr(mirror, name).offset, getattr(mirror, name).size)
                     for name, *_ in mirror._fields_]  # fmt: skip
        assert py_fields == btf_fields, f"{obj.name}: {cname} differs from its BTF"
    assert seen_in, f"struct {cname} is in no BPF object's BTF"


# .rodata variables besides tf_cfg, per object: load-time switches the tests set
# tests only: the d_seq check of names read from dentries switched off, in every object
# that reads them (vfs, and the syscall sets that resolve an opened fd to its path)
RODATA_SWITCHES = {
    o: {"tf_vfs_no_torn_check"} for o in ("vfs.bpf.o", "file.bpf.o", "net.bpf.o", "exec.bpf.o")
}


def _symbol_offsets(obj: Path) -> dict[str, int]:
    """Symbol name -> value (offset in its section) from the object's ELF symbol table."""
    out = subprocess.run(["readelf", "-sW", str(obj)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    rows = (ln.split() for ln in out.splitlines())
    return {f[7]: int(f[1], 16) for f in rows if len(f) == 8 and f[0].rstrip(":").isdigit()}


def test_rodata_holds_only_the_config(objects: list[Path]) -> None:
    """The agent writes TfConfig at offset 0 of .rodata before load; anything else there
    would be silently overwritten, so the only other variables allowed are the known
    load-time switches, placed after the config."""
    for obj in objects:
        types, _ = structs_in(obj)
        [sec] = [t for t in types.values() if t["kind"] == "DATASEC" and t["name"] == ".rodata"]
        names = {types[v["type_id"]]["name"]: v for v in sec["vars"]}
        assert set(names) == {"tf_cfg"} | RODATA_SWITCHES.get(obj.name, set()), (obj.name, names)
        assert names["tf_cfg"]["size"] == ctypes.sizeof(abi.TfConfig)
        offsets = _symbol_offsets(obj)
        assert offsets["tf_cfg"] == 0, obj.name
        for name in set(names) - {"tf_cfg"}:
            assert offsets[name] >= ctypes.sizeof(abi.TfConfig), (obj.name, name, offsets[name])


def test_enums_match_header() -> None:
    """Every enum constant the agent uses has the header's value."""
    header = (REPO / "bpf/include/tracefleet/events.h").read_text()
    import re

    consts = {m[1]: int(m[2]) for m in re.finditer(r"\b(TF_[A-Z0-9_]+)\s*=\s*(\d+)", header)}
    checks = {
        "TF_ST_": abi.Status, "TF_STRAT_": abi.Strategy, "TF_SC_": abi.Syscall,
        "TF_KIND_": abi.Kind, "TF_STAT_": abi.Stat, "TF_SET_": abi.EventSetId,
    }  # fmt: skip
    n = 0
    for prefix, enum in checks.items():
        for name, value in consts.items():
            if name.startswith(prefix) and not name.endswith("_MAX"):
                member = name[len(prefix) :]
                assert enum[member].value == value, name
                n += 1
    assert n > 40
    for name in ("TF_PATH_MAX", "TF_BLOB_MAX", "TF_ARGV_COUNT", "TF_ARG_MAX", "TF_SET_MAX"):
        m = re.search(rf"#define {name} (\d+)", header)
        assert m and int(m[1]) == getattr(abi, name), name
