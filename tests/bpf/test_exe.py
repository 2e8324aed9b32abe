"""Every event names the process's executable (``exe``): the full path of the running image,
from the identity in the record's header and the path the kernel walked the first time it
saw that file (tf_exes). What a hostile process gets reported is pinned here: a binary
renamed after it was first seen keeps the name it had then; one renamed before keeps its new
name; one deleted before it was first seen, and an exec'd memfd, end in " (deleted)"; an
exec's event names the new image."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WORKLOADS, scaled
from tracefleet.agent.capture.engine import Filters

pytestmark = pytest.mark.bpf
WL = WORKLOADS / "hostile_names"


def _copy(tmp_path: Path, name: str) -> Path:
    if not WL.exists():
        pytest.fail("workloads not built: run `make workloads`", pytrace=False)
    dst = tmp_path / name
    shutil.copy2(WL, dst)
    return dst


def _start(exe: str | Path, tmp_path: Path, **kw: Any) -> subprocess.Popen[str]:
    # hostile_names DIR PORT: per line on stdin, an openat under DIR (ENOENT), a connect
    proc = subprocess.Popen([str(exe), str(tmp_path), "9"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, **kw)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("pid ")
    return proc


def _iteration(proc: subprocess.Popen[str], n: int) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == f"done {n}\n"


def _openat_exes(cap: Any, pid: int, n: int, under: Path) -> list[str | None]:
    """exe of the workload's own openat calls (under DIR), in call order"""

    def mine(e: dict[str, Any]) -> bool:
        path = e["args"]["pathname"]["value"] or ""
        return e["pid"] == pid and e["syscall"] == "openat" and path.startswith(f"{under}/")

    evs = cap.wait_for(mine, n)
    assert len(evs) >= n, f"{len(evs)} openat events of {pid}, wanted {n}"
    return [e["exe"] for e in sorted(evs, key=lambda e: e["ts_ns"])]


def _finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()  # it re-executes itself and exits 0
    assert proc.wait(timeout=scaled(30)) == 0


def test_exe_is_the_binary_path_and_keeps_its_first_name(capture, tmp_path: Path):
    a = _copy(tmp_path, "wl-a")
    proc = _start(a, tmp_path)
    cap = capture(["file"], filters=Filters(pids=(proc.pid,)))
    _iteration(proc, 1)  # first seen as wl-a
    os.rename(a, tmp_path / "wl-b")
    _iteration(proc, 2)
    _finish(proc)
    assert _openat_exes(cap, proc.pid, 2, tmp_path) == [str(a), str(a)]


def test_exe_renamed_before_first_seen_has_its_new_name(capture, tmp_path: Path):
    a = _copy(tmp_path, "wl-c")
    proc = _start(a, tmp_path)
    cap = capture(["file"], filters=Filters(pids=(proc.pid,)))
    os.rename(a, tmp_path / "wl-d")  # no traced call of this file before
    _iteration(proc, 1)
    _finish(proc)
    assert _openat_exes(cap, proc.pid, 1, tmp_path) == [str(tmp_path / "wl-d")]


def test_exe_deleted_before_first_seen_is_marked_deleted(capture, tmp_path: Path):
    a = _copy(tmp_path, "wl-e")
    proc = _start(a, tmp_path)
    cap = capture(["file"], filters=Filters(pids=(proc.pid,)))
    os.unlink(a)
    _iteration(proc, 1)
    assert _openat_exes(cap, proc.pid, 1, tmp_path) == [f"{a} (deleted)"]
    assert os.readlink(f"/proc/{proc.pid}/exe") == f"{a} (deleted)"  # what the kernel says
    _finish(proc)


def test_exe_of_an_execd_memfd_is_marked(capture, tmp_path: Path):
    fd = os.memfd_create("tf-wl", 0)
    try:
        os.write(fd, WL.read_bytes())
        proc = _start(f"/proc/self/fd/{fd}", tmp_path, pass_fds=(fd,))
    finally:
        os.close(fd)
    cap = capture(["file"], filters=Filters(pids=(proc.pid,)))
    _iteration(proc, 1)
    want = os.readlink(f"/proc/{proc.pid}/exe")
    _finish(proc)
    assert want.startswith("/memfd:tf-wl") and want.endswith(" (deleted)"), want
    assert _openat_exes(cap, proc.pid, 1, tmp_path) == [want]


def test_exec_event_names_the_new_image(capture, tmp_path: Path):
    new = _copy(tmp_path, "wl-f")
    code = ("import os, sys\nsys.stdin.readline()\nos.path.exists('/tf-no-such-file')\n"
            f"os.execv({str(new)!r}, ['wl-f', 'x', '--exit'])\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)
    cap = capture(["exec", "file"], filters=Filters(pids=(proc.pid,)))
    proc.communicate("go\n", timeout=scaled(30))
    assert proc.returncode == 0
    evs = cap.wait_for(lambda e: e["pid"] == proc.pid and e["syscall"] == "execve")
    assert evs and evs[0]["ret"] == 0
    assert evs[0]["exe"] == str(new)
    # before the exec the same process ran the interpreter
    before = [e for e in cap.events if e["pid"] == proc.pid and e["syscall"] != "execve"
              and e["ts_ns"] < evs[0]["ts_ns"]]  # fmt: skip
    assert before, "no event of the interpreter"
    assert all(e["exe"] == os.path.realpath(sys.executable) for e in before), before[:2]


def test_resolver_keeps_what_the_kernel_evicted_and_never_guesses(host: None):
    """The agent's side on a real LRU map: a path read once stays cached when the kernel's
    map loses it; an identity the map does not hold is null with its cause counted; a kernel
    thread (no mm, identity 0) is null as no-mm."""
    import ctypes

    from tracefleet.agent.capture.exe import ExeResolver
    from tracefleet.agent.kernel import libbpf
    from tracefleet.agent.kernel.abi import Status, TfExeKey, TfHdr, TfStr

    fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_LRU_HASH, "tf_exes_test",
                           ctypes.sizeof(TfExeKey), ctypes.sizeof(TfStr), 64)  # fmt: skip
    try:
        path = b"/opt/app/bin/server"
        value = TfStr(len=len(path), status=Status.OK, data=path)
        libbpf.map_update(fd, TfExeKey(7, 0x800001, 3), value)
        long_ = TfStr(len=255, status=Status.TRUNCATED, data=b"x" * 255)
        libbpf.map_update(fd, TfExeKey(8, 0x800001, 3), long_)
        r = ExeResolver(fd)
        hdr = TfHdr(exe_ino=7, exe_dev=0x800001, exe_gen=3)
        assert r.path(hdr) == "/opt/app/bin/server"
        libbpf.map_delete(fd, TfExeKey(7, 0x800001, 3))  # evicted in the kernel
        assert r.path(hdr) == "/opt/app/bin/server" and r.lookups == 1
        assert r.path(TfHdr(exe_ino=7, exe_dev=0x800001, exe_gen=4)) is None  # reused inode
        assert r.path(TfHdr(exe_ino=8, exe_dev=0x800001, exe_gen=3)) is None  # truncated
        assert r.path(TfHdr()) is None  # a kernel thread
        assert r.counts() == {"not-in-map": 1, "truncated": 1, "no-mm": 1}
    finally:
        import os

        os.close(fd)
