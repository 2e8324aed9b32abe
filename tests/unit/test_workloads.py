"""Sanity checks of the cold-page C workloads (tests/workloads/README.md).

Builds nothing: `make workloads` puts the binaries in build/workloads/. Each workload is
run as an ordinary user process and its single JSON line is checked: well-formed, the
syscalls failed with the errno the scenario needs, and (via the workload's own
/proc/self/pagemap probe) the target pages were really cold (or warm) at the call.
Needs no root and no BPF.
"""

import errno
import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WL = ROOT / "build" / "workloads"

if not WL.is_dir():
    pytest.skip(
        f"{WL} is absent: run `make workloads` to build the C workloads",
        allow_module_level=True,
    )

MODES = ["openat", "einval", "openat2", "connect", "connect6", "connect_unix", "exec"]
MODE_ERRNO = {
    "openat": {errno.ENOENT},
    "einval": {errno.EINVAL},
    "openat2": {errno.ENOENT},
    "connect": {errno.ECONNREFUSED},
    # ::1 without IPv6 on the host gives one of the latter two.
    "connect6": {errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.ENETUNREACH},
    "connect_unix": {errno.ENOENT},
    "exec": {0},
}
MODE_CALLS = {
    "openat": [("openat", "pathname")],
    "einval": [("openat", "pathname")],
    "openat2": [("openat2", "pathname"), ("openat2", "how")],
    "connect": [("connect", "uservaddr")],
    "connect6": [("connect", "uservaddr")],
    "connect_unix": [("connect", "uservaddr")],
    "exec": [("execve", a) for a in ("filename", "argv[0]", "argv[1]", "argv[2]")],
}
COLD_RODATA_PATHS = {
    "openat": "/proc/tf-nonexistent-dir/cold-rodata-openat",
    "einval": "/proc/tf-nonexistent-dir/cold-rodata-einval",
    "openat2": "/proc/tf-nonexistent-dir/cold-rodata-openat2",
}
EXEC_STRINGS = ["/bin/true", "/bin/true", "--tf-arg-1", "tf-arg-two"]
CALL_KEYS = {
    "syscall",
    "arg",
    "encoding",
    "expect",
    "len",
    "addr",
    "ret",
    "errno",
    "errno_name",
    "pte_present",
    "swapped",
}


def binary(name):
    path = WL / name
    if not os.access(path, os.X_OK):
        pytest.skip(f"{path} not built (run `make workloads`)")
    return str(path)


def run(name, *args, timeout=60, env=None):
    p = subprocess.run(
        [binary(name), *args], capture_output=True, text=True, timeout=timeout, check=False,
        env=env,
    )  # fmt: skip
    assert p.returncode == 0, f"{name} {args}: exit {p.returncode}, stderr: {p.stderr}"
    lines = p.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {p.stdout!r}"
    return check_doc(json.loads(lines[0]), name)


def check_doc(d, name):
    assert d["workload"] == name
    assert isinstance(d["pid"], int) and d["pid"] > 0
    assert isinstance(d["calls"], list)
    for c in d["calls"]:
        assert set(c) >= CALL_KEYS, c
        assert c["encoding"] in ("string", "hex")
        if c["encoding"] == "string":
            assert len(c["expect"].encode()) + 1 == c["len"]
        else:
            assert len(c["expect"]) == 2 * c["len"]
            bytes.fromhex(c["expect"])
        assert int(c["addr"], 16) > 0
        if c["errno"]:
            assert c["ret"] == -1
            assert c["errno_name"] == errno.errorcode[c["errno"]]
        else:
            assert c["errno_name"] is None
        assert len(c["pte_present"]) == len(c["swapped"]) >= 1
    return d


def pte(c):
    """The call's PTE states, or skip if the workload could not read pagemap."""
    if None in c["pte_present"]:
        pytest.skip("/proc/self/pagemap unreadable here")
    return c["pte_present"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["cold_rodata", "warm"])
def test_rodata_and_warm_modes(name, mode):
    d = run(name, mode)
    assert d["mode"] == mode
    assert [(c["syscall"], c["arg"]) for c in d["calls"]] == MODE_CALLS[mode]
    for c in d["calls"]:
        assert c["errno"] in MODE_ERRNO[mode], c
        if name == "cold_rodata":
            assert pte(c) == [False], f"target page was resident before the call: {c}"
        else:
            assert all(pte(c)), c
    if name == "cold_rodata":
        assert d["aligned"] is True
        if mode in COLD_RODATA_PATHS:
            assert d["calls"][0]["expect"] == COLD_RODATA_PATHS[mode]
    if mode == "exec":
        assert d["pre_exec"] is True
        assert [c["expect"] for c in d["calls"]] == EXEC_STRINGS


def test_cold_rodata_structs():
    how = run("cold_rodata", "openat2")["calls"][1]
    raw = bytes.fromhex(how["expect"])
    assert len(raw) == 24  # struct open_how: flags, mode, resolve (u64 each)
    assert int.from_bytes(raw[16:24], "little") == 0x04  # RESOLVE_NO_SYMLINKS
    sin = bytes.fromhex(run("cold_rodata", "connect")["calls"][0]["expect"])
    assert sin[:8] == bytes([2, 0, 0, 9, 127, 0, 0, 1])  # AF_INET, port 9, 127.0.0.1
    sun = bytes.fromhex(run("cold_rodata", "connect_unix")["calls"][0]["expect"])
    assert sun[2:].rstrip(b"\0").decode().endswith("cold-rodata-connect-unix.sock")


def test_warm_port():
    c = run("warm", "connect", "--port", "1")["calls"][0]
    assert bytes.fromhex(c["expect"])[2:4] == (1).to_bytes(2, "big")


def test_cold_filemap(tmp_path):
    data = tmp_path / "cold.dat"
    d = run("cold_filemap", "--file", str(data), "--count", "12")
    assert d["file"] == str(data) and d["stride"] == 65536
    assert len(d["calls"]) == 12
    assert len({c["expect"] for c in d["calls"]}) == 12
    addrs = [int(c["addr"], 16) for c in d["calls"]]
    assert all(b - a == 65536 for a, b in itertools.pairwise(addrs))
    for c in d["calls"]:
        assert c["syscall"] == "openat" and c["errno"] == errno.ENOENT
        assert str(d["pid"]) in c["expect"]
        assert pte(c) == [False], c
    assert not data.exists(), "data file should be removed without --keep"


def test_cold_filemap_default_count():
    d = run("cold_filemap")
    assert len(d["calls"]) == 30
    assert not Path(d["file"]).exists()


@pytest.mark.parametrize("name", ["cold_filemap", "cold_cross"])
def test_default_data_file_is_under_tmpdir(name, tmp_path):
    """Without --file the data file goes to $TMPDIR (a test's own directory; in the 7.2
    guest a tmpfs under /run when the host's /tmp is shown read-only), never to /tmp."""
    d = run(name, "--keep", env={**os.environ, "TMPDIR": str(tmp_path)})
    data = Path(d["file"])
    assert data.parent == tmp_path and data.is_file(), d["file"]
    assert data.name == f"tf-{name.replace('_', '-')}-{d['pid']}.dat"


def test_bad_tmpdir_is_a_usage_error_naming_the_fix(tmp_path):
    bad = tmp_path / 'a"b'
    p = subprocess.run(
        [binary("cold_filemap")], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "TMPDIR": str(bad)},
    )  # fmt: skip
    assert p.returncode == 2 and p.stdout == "", p
    assert f"TMPDIR '{bad}'" in p.stderr and "pass --file" in p.stderr, p.stderr


def test_cold_cross(tmp_path):
    d = run("cold_cross", "--file", str(tmp_path / "x.dat"))
    (c,) = d["calls"]
    assert c["errno"] == errno.ENOENT
    start = int(c["addr"], 16)
    assert start % 4096 == 4096 - d["split"]  # starts `split` bytes before a page end
    assert pte(c) == [True, False], "want: first page resident, second not"


# cold_anon_swap needs a swap device, which takes root to make: it is checked, with its
# capture, by tests/bpf/test_capture_cold.py::test_swapped_out_anonymous_memory.


def test_hold_ms_keeps_memory_readable():
    """During --hold-ms the process is alive and its cold target readable via /proc/pid/mem
    (what a user-space fallback reader does)."""
    hold = 1500
    t0 = time.monotonic()
    p = subprocess.Popen(
        [binary("cold_rodata"), "openat", "--hold-ms", str(hold)], stdout=subprocess.PIPE, text=True
    )
    try:
        d = check_doc(json.loads(p.stdout.readline()), "cold_rodata")
        assert d["pid"] == p.pid and d["hold_ms"] == hold
        assert p.poll() is None, "exited before the hold elapsed"
        c = d["calls"][0]
        want = c["expect"].encode() + b"\0"
        # our own child: readable under yama ptrace_scope 0 and 1 (the fallback's case); a
        # PermissionError here is a failure, not something to pass over
        with open(f"/proc/{p.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(int(c["addr"], 16))
            assert mem.read(len(want)) == want
        assert p.wait(timeout=30) == 0
        assert time.monotonic() - t0 >= hold / 1000
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("args", [["--bogus"], ["--hold-ms"], ["--hold-ms", "x"]])
def test_usage_errors(args):
    p = subprocess.run(
        [binary("warm"), "openat", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert p.returncode == 2 and p.stdout == "" and "usage" in p.stderr
