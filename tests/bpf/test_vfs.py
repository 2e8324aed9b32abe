"""The `vfs` event set on the real kernel: one record per file-system operation on any file
system, from whichever hook the kernel allows (fentry on the vfs_* functions, else the
syscall tracepoints), with names that a concurrent rename cannot tear unnoticed.

Each test runs once per hook; a hook the kernel refuses is skipped only for a refusal that
tests/expected_skips.json lists for this kernel (this 6.18 host refuses fentry with EPERM;
the 7.2 guest allows both), and fails otherwise."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BPF_DIR, scaled, skip_if_known_refusal, wait_until

HOOKS = ("fentry", "tracepoint")
_engines: dict[str, Any] = {}
_refused: dict[str, str] = {}


def _no_torn_check_offset() -> int:
    """Offset in vfs.bpf.o's .rodata of the tf_vfs_no_torn_check switch (its ELF symbol)."""
    out = subprocess.run(["readelf", "-sW", str(BPF_DIR / "vfs.bpf.o")], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    for line in out.splitlines():
        if line.split()[-1:] == ["tf_vfs_no_torn_check"]:
            return int(line.split()[1], 16)
    raise AssertionError("vfs.bpf.o has no tf_vfs_no_torn_check symbol: run `make bpf`")


def _engine(hook: str, torn_check: bool = True) -> Any:
    """One engine per hook, forced to it, loaded once for the module (or the refusal).
    ``torn_check=False`` loads a private one with the d_seq check switched off at load time
    (the negative control of the rename storm); the caller closes it."""
    from tracefleet.agent.capture import ladder
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.kernel.abi import Strategy

    if not torn_check:
        _engine(hook)  # the refusal first
        off = _no_torn_check_offset()
        opener = ladder.open_configured

        def open_unchecked(*a: Any, **kw: Any) -> Any:
            obj = opener(*a, **kw)
            obj.rodata_map().initial_value()[off] = 1
            return obj

        forced = {"vfs": Strategy.from_label(hook)}
        eng = BpfEngine(EngineOptions(strategies=forced, bpf_dir=BPF_DIR, hold_seconds=3600,
                                      sets=("vfs",)))  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ladder, "open_configured", open_unchecked)
            assert eng.ensure_loaded("vfs").loaded, eng.ensure_loaded("vfs").attempts
        eng.start()
        return eng
    if hook not in _engines and hook not in _refused:
        forced = {"vfs": Strategy.from_label(hook)}
        eng = BpfEngine(EngineOptions(strategies=forced, bpf_dir=BPF_DIR, hold_seconds=3600,
                                      sets=("vfs",)))  # fmt: skip
        st = eng.ensure_loaded("vfs")
        if st.loaded is None:
            _refused[hook] = "; ".join(a.reason for a in st.attempts)
            eng.close()
        else:
            eng.start()
            _engines[hook] = eng
    if hook in _refused:
        skip_if_known_refusal(hook, "vfs", _refused[hook])
    return _engines[hook]


@pytest.fixture(scope="module", autouse=True)
def _close_engines(host: None) -> Iterator[None]:
    yield
    for eng in _engines.values():
        eng.close()
    _engines.clear()
    _refused.clear()


@contextlib.contextmanager
def vfs_capture(hook: str, comm: str, engine: Any = None) -> Iterator[list[dict[str, Any]]]:
    from tracefleet.agent.capture.engine import EventSetConfig, Filters

    eng = engine or _engine(hook)
    events: list[dict[str, Any]] = []
    eng.add_sink(events.append)
    st = eng.apply({"vfs": EventSetConfig("vfs", True, Filters(comms=(comm,)))})
    assert [s for s in st if s.name == "vfs" and s.enabled and s.attached], st
    try:
        yield events
        time.sleep(0.3)
        eng.drain()
    finally:
        eng.apply({})
        eng.remove_sink(events.append)


def run_as(comm: str, script: str, *args: str, timeout: float = 120) -> str:
    """Run a Python script under command name ``comm`` (the capture filters on it)."""
    prog = f"import ctypes; ctypes.CDLL(None).prctl(15, {comm.encode()!r}, 0, 0, 0)\n" + script
    out = subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def _kernel_has_fs(name: str) -> bool:
    if name not in Path("/proc/filesystems").read_text().split():
        with contextlib.suppress(FileNotFoundError):  # no kmod: built-in file systems only
            subprocess.run(["modprobe", name], capture_output=True, check=False)
    return name in Path("/proc/filesystems").read_text().split()


def missing_fs(fs: str) -> None:
    if not _kernel_has_fs(fs):
        pytest.skip(f"{fs} is not in this kernel ({os.uname().release}) and no module "
                    "could be loaded (the 7.2 guest boots a bare vmlinuz: Debian builds "
                    f"{fs} and loop as modules)")  # fmt: skip


@contextlib.contextmanager
def mounted(fs: str, tmp_path: Path) -> Iterator[Path]:
    """A fresh file system of type ``fs`` (tmpfs, overlay, or ext4 on a loop image made here),
    unmounted afterwards; skipped with the reason where this kernel cannot mount it."""
    root = tmp_path / fs
    root.mkdir()
    if fs == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tftest", str(root)],
                       check=True)  # fmt: skip
    elif fs == "overlay":  # a container's root file system: upper and lower on tmp_path
        missing_fs(fs)
        parts = {n: tmp_path / f"ovl-{n}" for n in ("lower", "upper", "work")}
        for d in parts.values():
            d.mkdir()
        opts = ",".join(f"{n}dir={d}" for n, d in parts.items())
        subprocess.run(["mount", "-t", "overlay", "-o", opts, "tfovl", str(root)], check=True)
    else:
        missing_fs(fs)
        img = tmp_path / f"{fs}.img"
        with open(img, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run([f"mkfs.{fs}", "-q", "-F", str(img)], check=True, capture_output=True)
        mnt = subprocess.run(["mount", "-o", "loop", str(img), str(root)], capture_output=True,
                             text=True)  # fmt: skip
        if mnt.returncode:
            pytest.skip(f"cannot loop-mount {fs} here: {mnt.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


WORKLOAD = textwrap.dedent(
    """
    import json, os, sys
    d = sys.argv[1]
    p = lambda n: os.path.join(d, n)
    fd = os.open(p("a.txt"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x" * 100)
    os.write(fd, b"y" * 23)
    os.close(fd)
    ino = os.stat(p("a.txt")).st_ino
    os.rename(p("a.txt"), p("b.txt"))
    fd = os.open(p("b.txt"), os.O_RDONLY)
    os.read(fd, 50)
    os.read(fd, 500)
    os.close(fd)
    os.truncate(p("b.txt"), 10)
    os.chmod(p("b.txt"), 0o600)
    os.mkdir(p("sub"))
    sub = os.stat(p("sub")).st_ino
    os.symlink("b.txt", p("ln"))
    ln = os.lstat(p("ln")).st_ino
    os.link(p("b.txt"), p("hard"))
    os.unlink(p("ln"))
    os.unlink(p("hard"))
    os.unlink(p("b.txt"))
    os.rmdir(p("sub"))
    print(json.dumps({"ino": ino, "sub": sub, "ln": ln}))
    """
)


def _in(events: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    prefix = str(root) + "/"
    return [e for e in events if (e["args"]["path"]["value"] or "").startswith(prefix)]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("fs", ["tmpfs", "ext4", "overlay"])
def test_workload_gives_exactly_the_expected_events(hook: str, fs: str, tmp_path: Path) -> None:
    _engine(hook)  # skips first if the kernel refuses the hook
    with mounted(fs, tmp_path) as root, vfs_capture(hook, "tfvfswl") as events:
        st = os.stat(root)
        dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        out = json.loads(run_as("tfvfswl", WORKLOAD, str(root)).strip().splitlines()[-1])
    got = _in(events, root)
    a, b = str(root / "a.txt"), str(root / "b.txt")
    sub, ln, hard = str(root / "sub"), str(root / "ln"), str(root / "hard")
    wr, rd = os.O_WRONLY, os.O_RDONLY
    expected = [
        ("vfs_open", a, None),
        ("vfs_close", a, None),
        ("vfs_rename", a, b),
        ("vfs_open", b, None),
        ("vfs_close", b, None),
        ("vfs_truncate", b, None),
        ("vfs_setattr", b, None),
        ("vfs_mkdir", sub, None),
        ("vfs_symlink", ln, "b.txt"),
        ("vfs_link", b, hard),
        ("vfs_unlink", ln, None),
        ("vfs_unlink", hard, None),
        ("vfs_unlink", b, None),
        ("vfs_rmdir", sub, None),
    ]

    def second(e: dict[str, Any]) -> str | None:
        for k in ("new_path", "target"):
            if k in e["args"]:
                return e["args"][k]["value"]
        return None

    seen = [(e["syscall"], e["args"]["path"]["value"], second(e)) for e in got]
    print(f"\nVFS {hook} on {fs}: {len(got)} events; path kinds "
          f"{sorted({(e['syscall'], e['args']['path']['kind']) for e in got})}")  # fmt: skip
    assert seen == expected
    for e in got:
        args = e["args"]
        assert e["ret"] == 0 or e["syscall"] == "vfs_open", e
        assert args["path"]["status"] == "ok", e
        assert args["fstype"]["value"] == fs, e
        assert args["dev"]["value"] == dev, e
        assert e["strategy"] == hook
    # the inode each operation names: the file, the directory, or the symlink itself
    inodes = [out["ino"]] * 7 + [out["sub"], out["ln"], out["ino"], out["ln"], out["ino"],
                                 out["ino"], out["sub"]]  # fmt: skip
    for e, want in zip(got, inodes, strict=True):
        # the tracepoint hook cannot know it for a path operation (no lookup at a syscall)
        if e["args"]["inode"]["value"] is not None or hook == "fentry":
            assert e["args"]["inode"]["value"] == want, e
    opens = [e for e in got if e["syscall"] == "vfs_open"]
    assert [o["ret"] >= 0 for o in opens] == [True, True]
    # the file's f_flags: the kernel keeps the access mode (creation flags are consumed)
    assert [o["args"]["flags"]["value"] & os.O_ACCMODE for o in opens] == [wr, rd]
    assert [o["args"]["inode"]["value"] for o in opens] == [out["ino"], out["ino"]]
    closes = [e["args"] for e in got if e["syscall"] == "vfs_close"]
    assert [(c["bytes_written"]["value"], c["writes"]["value"], c["pos"]["value"])
            for c in closes] == [(123, 2, 123), (0, 0, 123)]  # fmt: skip
    assert [(c["bytes_read"]["value"], c["reads"]["value"]) for c in closes] == [(0, 0), (123, 2)]
    trunc = next(e for e in got if e["syscall"] == "vfs_truncate")
    assert trunc["args"]["length"]["value"] == 10
    mkdir = next(e for e in got if e["syscall"] == "vfs_mkdir")
    assert mkdir["args"]["mode"]["value"] & 0o777 == 0o777


RENAMER = textwrap.dedent(
    """
    import os, sys, time
    os.sched_setaffinity(0, {int(sys.argv[3])})
    d, n = sys.argv[1], float(sys.argv[2])
    a, b = os.path.join(d, "a", "n" * 5), os.path.join(d, "b", "LONGNAME" * 4)
    os.close(os.open(os.path.join(os.path.dirname(d), "storm-start"), os.O_RDONLY))
    end, i = time.monotonic() + n, 0
    while time.monotonic() < end:
        os.rename(a, b)
        os.rename(b, a)
        i += 2
    print(i)
    """
)
READER = textwrap.dedent(
    """
    import os, sys, time
    os.sched_setaffinity(0, {int(sys.argv[3])})
    d, n = sys.argv[1], float(sys.argv[2])
    names = [os.path.join(d, "a", "n" * 5), os.path.join(d, "b", "LONGNAME" * 4)]
    os.close(os.open(os.path.join(os.path.dirname(d), "storm-start"), os.O_RDONLY))
    end, opened = time.monotonic() + n, 0
    while time.monotonic() < end:
        for p in names:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            os.read(fd, 64)
            os.close(fd)
            opened += 1
    print(opened)
    """
)


@pytest.mark.parametrize("hook", HOOKS)
def test_a_reused_device_number_names_the_new_file_system(hook: str, tmp_path: Path) -> None:
    """Anonymous device numbers (tmpfs, overlay, every container's root) go to the next mount
    as soon as they are freed: an event on the new mount names the new file system, never
    the unmounted one that had its number a moment before (a cached mount table did, in
    about one CI run in four)."""
    _engine(hook)
    missing_fs("overlay")
    tmpfs, ovl = tmp_path / "tmpfs", tmp_path / "ovl"
    layers = {n: tmp_path / f"ovl-{n}" for n in ("lower", "upper", "work")}
    for d in (tmpfs, ovl, *layers.values()):
        d.mkdir()
    opts = ",".join(f"{n}dir={d}" for n, d in layers.items())
    mkdir = "import os, sys; os.mkdir(sys.argv[1])"

    def fstype_of(events: list[dict[str, Any]], path: Path) -> Any:
        return next((e["args"]["fstype"]["value"] for e in events
                     if e["args"]["path"]["value"] == str(path)), None)  # fmt: skip

    with vfs_capture(hook, "tfvfsdev") as events:
        try:
            subprocess.run(["mount", "-t", "tmpfs", "tfdev", str(tmpfs)], check=True)
            dev = os.stat(tmpfs).st_dev
            run_as("tfvfsdev", mkdir, str(tmpfs / "a"))
            first = wait_until(lambda: fstype_of(events, tmpfs / "a"), what="the tmpfs event")
            assert first == "tmpfs"
            subprocess.run(["umount", str(tmpfs)], check=True)
            # the freed number goes to the next anonymous mount (lowest free first), unless
            # another mount on this machine took it in between: then try again
            for _ in range(20):
                subprocess.run(["mount", "-t", "overlay", "-o", opts, "tfdev", str(ovl)],
                               check=True)  # fmt: skip
                if os.stat(ovl).st_dev == dev:
                    break
                subprocess.run(["umount", str(ovl)], check=True)
            else:
                pytest.skip("the overlay never got the unmounted tmpfs's device number back")
            run_as("tfvfsdev", mkdir, str(ovl / "b"))
            got = wait_until(lambda: fstype_of(events, ovl / "b"), what="the overlay event")
        finally:
            for d in (ovl, tmpfs):
                subprocess.run(["umount", "-l", str(d)], capture_output=True, check=False)
    assert got == "overlay", f"device {os.major(dev)}:{os.minor(dev)} reported as {got}"


@pytest.mark.parametrize("hook", HOOKS)
def test_close_reports_the_path_at_open_even_after_a_rename(hook: str, tmp_path: Path) -> None:
    """The path is resolved once per open file and kept with its state: the close reports
    the name the file had at open (path kind `at-open`), not the one a rename gave it since,
    with the bytes written through it."""
    eng = _engine(hook)
    d = Path(os.path.realpath(tmp_path)) / "ren"
    d.mkdir()
    before, after = d / "before.txt", d / "after.txt"
    script = textwrap.dedent("""
        import os, sys
        fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o600)
        os.rename(sys.argv[1], sys.argv[2])
        os.write(fd, b"12345")
        os.close(fd)
    """)
    with vfs_capture(hook, "tf_vfs_ren") as events:
        run_as("tf_vfs_ren", script, str(before), str(after))

        def closed() -> list[dict[str, Any]]:
            eng.drain()
            return [e for e in _in(events, d) if e["syscall"] == "vfs_close"]

        [close] = wait_until(closed, scaled(30), "the close of the renamed file")
    [opened] = [e for e in _in(events, d) if e["syscall"] == "vfs_open"]
    assert opened["args"]["path"]["value"] == str(before)
    assert [e["args"]["new_path"]["value"] for e in _in(events, d)
            if e["syscall"] == "vfs_rename"] == [str(after)]  # fmt: skip
    assert close["args"]["path"]["value"] == str(before), close["args"]["path"]
    assert close["args"]["path"]["kind"] == "at-open"
    assert close["args"]["path"]["status"] == "ok"
    assert close["args"]["inode"]["value"] == opened["args"]["inode"]["value"]
    assert close["args"]["bytes_written"]["value"] == 5
    assert close["args"]["writes"]["value"] == 1


REUSE = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: its slab reuses
    d, n = sys.argv[1], int(sys.argv[2])
    old, new = os.path.join(d, "old"), os.path.join(d, "new")
    h = ctypes.create_string_buffer(8 + 128)  # struct file_handle, MAX_HANDLE_SZ
    ctypes.c_uint.from_buffer(h).value = 128
    mnt = ctypes.c_int()
    if libc.name_to_handle_at(-100, new.encode(), h, ctypes.byref(mnt), 0):
        sys.exit(f"name_to_handle_at: {os.strerror(ctypes.get_errno())}")
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(n):
        fd = os.open(old, os.O_RDONLY)  # an open the hook sees: its state is cached
        os.read(fd, 3)
        # closed without close(2), then a file opened without an open the tracepoint hook
        # sees: the freed struct file's address is likely the new file's
        if libc.syscall(436, fd, fd, 0):  # close_range
            sys.exit(f"close_range: {os.strerror(ctypes.get_errno())}")
        nfd = libc.open_by_handle_at(dfd, h, os.O_WRONLY)
        if nfd < 0:
            sys.exit(f"open_by_handle_at: {os.strerror(ctypes.get_errno())}")
        os.write(nfd, b"x" * (i + 1))
        os.close(nfd)
    """
)


@pytest.mark.parametrize("hook", HOOKS)
def test_a_reused_file_address_reports_only_its_own_bytes(hook: str, tmp_path: Path) -> None:
    """A struct file's address is reused once the file is freed; its state in the kernel is
    keyed by that address. A file closed unseen (close_range) leaves its state behind, and a
    file opened unseen (open_by_handle_at: no tracepoint) at the same address must neither add
    its writes to that state (its close then dropped them as another file's: 0 bytes) nor
    report the old file's reads: each close of `new` reports exactly the i+1 bytes written."""
    n = 40
    _engine(hook)
    with mounted("tmpfs", tmp_path) as root:  # file handles: tmpfs exports them everywhere
        (root / "old").write_bytes(b"abc")
        (root / "new").write_bytes(b"")
        new = str(root / "new")
        with vfs_capture(hook, "tfvfsreuse") as events:
            run_as("tfvfsreuse", REUSE, str(root), str(n))

            def closes() -> list[dict[str, Any]]:
                got = [e["args"] for e in list(events) if e["syscall"] == "vfs_close"]
                got = [a for a in got if a["path"]["value"] == new]
                return got if len(got) >= n else []

            got = wait_until(closes, scaled(30), f"{n} closes of {new}")
    wrong = [(i, c["bytes_written"]["value"], c["writes"]["value"], c["bytes_read"]["value"])
             for i, c in enumerate(got)
             if (c["bytes_written"]["value"], c["writes"]["value"], c["bytes_read"]["value"],
                 c["reads"]["value"]) != (i + 1, 1, 0, 0)]  # fmt: skip
    print(f"\nVFS {hook}: {len(got)} closes of a file opened by handle, {len(wrong)} wrong")
    assert len(got) == n, got
    assert not wrong, f"(iteration, bytes written, writes, bytes read) off: {wrong}"


ALTERNATE = textwrap.dedent(
    """
    import os, sys
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: its slab reuses
    d, n = sys.argv[1], int(sys.argv[2])
    for i in range(n):
        fd = os.open(os.path.join(d, "w"), os.O_WRONLY)
        os.write(fd, b"x" * (i + 1))
        os.close(fd)
        # opened where the file just closed was (the address a closed struct file leaves)
        os.close(os.open(os.path.join(d, "r"), os.O_RDONLY))
    """
)


@pytest.mark.parametrize("hook", HOOKS)
def test_a_file_opened_where_one_was_closed_starts_from_nothing(hook: str, tmp_path: Path) -> None:
    """Open, write and close one file, then open and close another, n times on one CPU: the
    second file is opened at the address the first one's struct file left, where the kernel
    keeps the closed file's state for the next open to rewrite. Each close reports its own
    file's path and bytes only: `w` i+1 bytes in one write, `r` nothing (not w's bytes)."""
    n = 40
    _engine(hook)
    with mounted("tmpfs", tmp_path) as root:
        (root / "w").write_bytes(b"")
        (root / "r").write_bytes(b"")
        w, r = str(root / "w"), str(root / "r")
        with vfs_capture(hook, "tfvfsalt") as events:
            run_as("tfvfsalt", ALTERNATE, str(root), str(n))

            def closes() -> list[dict[str, Any]]:
                got = [e["args"] for e in list(events) if e["syscall"] == "vfs_close"]
                got = [a for a in got if a["path"]["value"] in (w, r)]
                return got if len(got) >= 2 * n else []

            got = wait_until(closes, scaled(30), f"{2 * n} closes of {w} and {r}")
    seen = [(c["path"]["value"], c["bytes_written"]["value"], c["writes"]["value"],
             c["bytes_read"]["value"], c["reads"]["value"]) for c in got]  # fmt: skip
    want = [x for i in range(n) for x in ((w, i + 1, 1, 0, 0), (r, 0, 0, 0, 0))]
    wrong = [(i, a, b) for i, (a, b) in enumerate(zip(seen, want, strict=True)) if a != b]
    print(f"\nVFS {hook}: {len(got)} closes alternating two files, {len(wrong)} wrong")
    assert not wrong, f"(index, got, expected): {wrong[:5]}"


def _storm(hook: str, d: Path, engine: Any = None) -> tuple[int, int, list[Any]]:
    """Rename a file back and forth between two names in two directories in a tight loop on
    one CPU while another CPU opens and reads it (a torn read can pair one name with the
    other directory); returns (names checked, marked torn, wrong names). Every name of the
    storm file's inode the two processes produced after their start marker is checked,
    wherever it points: a torn read can yield a directory other than ``d``, so nothing is
    filtered by prefix first. Other inodes are the files the processes inherited (stdin,
    pytest's capture file: an O_TMPFILE, "#<inode> (deleted)"), closed at exit, which the
    fentry hook sees (filp_flush) and the syscall tracepoints do not: a storm name on one
    of them is wrong too."""
    (d / "a").mkdir()
    (d / "b").mkdir()
    (d / "a" / ("n" * 5)).write_bytes(b"payload")
    storm_ino = (d / "a" / ("n" * 5)).stat().st_ino
    valid = {str(d / "a" / ("n" * 5)), str(d / "b" / ("LONGNAME" * 4))}
    marker = str(d.parent / "storm-start")
    Path(marker).touch()
    cpus = sorted(os.sched_getaffinity(0))
    cpu_a, cpu_b = cpus[0], cpus[-1]
    seconds = "3"
    eng = engine or _engine(hook)
    dropped0 = eng.kernel_counters("vfs")["dropped"]
    with vfs_capture(hook, "tfstorm", engine) as events:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import ctypes; ctypes.CDLL(None).prctl(15, b'tfstorm',0,0,0)\n" + script,
                    str(d),
                    seconds,
                    str(cpu),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for script, cpu in ((RENAMER, cpu_a), (READER, cpu_b))
        ]
        renames, opened = (int(p.communicate(timeout=120)[0].strip()) for p in procs)
    assert renames > 0 and opened > 0
    checked = torn = 0
    bad = []
    for p in procs:
        mine = [e for e in events if e["pid"] == p.pid]
        starts = [i for i, e in enumerate(mine) if e["args"]["path"]["value"] == marker]
        if not starts:
            # the ring overflowed (a consumer starved on a loaded host): a void round,
            # unless nothing was dropped, then the marker's event is missing for real
            dropped = eng.kernel_counters("vfs")["dropped"] - dropped0
            assert dropped, f"no event of pid {p.pid} opening {marker}, none dropped"
            print(f"\nVFS {hook} rename storm: void round, {dropped} records dropped")
            return 0, 0, []
        for e in mine[starts[-1] + 1 :]:  # after the marker's open and close
            for key in ("path", "new_path"):
                arg = e["args"].get(key)
                if not arg or arg["value"] is None:
                    continue
                checked += 1
                ino = e["args"].get("inode", {}).get("value")
                if ino is not None and ino != storm_ino:
                    # another file (no inode: a path operation at a syscall tracepoint, or a
                    # failed open; checked as the storm's)
                    if arg["status"] != "torn" and arg["value"].startswith(f"{d}/"):
                        bad.append((e["syscall"], arg, ino))
                    continue
                checked += 1
                if arg["status"] == "torn":
                    torn += 1
                    continue
                if arg["value"] not in valid:
                    bad.append((e["syscall"], arg, ino))
    print(
        f"\nVFS {hook} rename storm{'' if engine is None else ' (torn check off)'}: {renames} "
        f"renames on CPU {cpu_a}, {opened} opens+reads on CPU {cpu_b}; {checked} names "
        f"checked, {torn} marked torn, {len(bad)} wrong"
    )
    return checked, torn, bad


def _storms_until(hook: str, root: Path, done: Callable[[int, list[Any]], bool],
                  engine: Any = None) -> tuple[int, int, list[Any]]:  # fmt: skip
    """Storm rounds until ``done(torn, wrong)`` holds: a race shows up in some rounds only,
    so the wait is for the event, under a deadline scaled to the machine."""
    deadline = time.monotonic() + min(scaled(60.0), 400.0)  # under pytest's 600 s timeout
    checked = torn = 0
    bad: list[Any] = []
    for i in itertools.count():
        (root / f"round{i}").mkdir()
        c, t, b = _storm(hook, root / f"round{i}", engine)
        checked, torn, bad = checked + c, torn + t, bad + b
        if done(torn, bad) or time.monotonic() > deadline:
            return checked, torn, bad
    raise AssertionError("unreachable")


@pytest.mark.parametrize("hook", HOOKS)
def test_rename_storm_never_reports_a_name_that_never_existed(hook: str, tmp_path: Path) -> None:
    # until some name was marked torn: the check must have had something to catch, or the
    # run proves nothing; a wrong name ends the wait at once
    checked, torn, bad = _storms_until(hook, tmp_path, lambda torn, bad: torn > 0 or bool(bad))
    assert checked > 0
    assert not bad, bad[:5]
    assert torn > 0, "no name was marked torn: the storm raced nothing"


@pytest.mark.parametrize("hook", HOOKS)
def test_rename_storm_without_the_torn_check_finds_wrong_names(hook: str, tmp_path: Path) -> None:
    """Negative control: the same storm with the d_seq check switched off at load time
    reports wrong names, so the test above would catch a check that stopped working."""
    eng = _engine(hook, torn_check=False)
    try:
        checked, torn, bad = _storms_until(hook, tmp_path, lambda torn, bad: bool(bad), eng)
    finally:
        eng.close()
    print(f"wrong names with the check off (first 3): {[b[1]['value'] for b in bad[:3]]}")
    assert checked > 0
    assert torn == 0, "names marked torn with the check switched off"
    assert bad, "the storm produced no wrong name with the check off: it tests nothing"


UNLINKED = textwrap.dedent(
    """
    import json, os, sys
    d = sys.argv[1]
    tmp = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)  # never had a name
    os.write(tmp, b"t")
    p = os.path.join(d, "gone.txt")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    os.unlink(p)  # unlinked while open
    os.write(fd, b"g")
    # both open at once: distinct inodes (a freed inode number is reused)
    tmp_ino, gone_ino = os.fstat(tmp).st_ino, os.fstat(fd).st_ino
    os.close(fd)
    os.close(tmp)
    print(json.dumps({"tmp": tmp_ino, "gone": gone_ino}))
    """
)


@pytest.mark.parametrize("hook", HOOKS)
def test_a_file_without_a_name_is_reported_deleted(hook: str, tmp_path: Path) -> None:
    """The close of an O_TMPFILE and of a file unlinked while open: the kernel names the
    first "#<inode>" and keeps the second's old name, neither in the namespace any more. The
    path says so as d_path() and /proc/PID/fd do (" (deleted)"), never as a live name."""
    with vfs_capture(hook, "tfunlinked") as events:
        out = json.loads(run_as("tfunlinked", UNLINKED, str(tmp_path)))
    closes = {e["args"]["inode"]["value"]: e["args"]["path"] for e in events
              if e["syscall"] == "vfs_close"}  # fmt: skip
    print(f"\nVFS {hook}: closes of unlinked files: "
          f"{[closes.get(out[k], {}).get('value') for k in ('tmp', 'gone')]}")  # fmt: skip
    assert closes[out["tmp"]]["value"] == f"{tmp_path}/#{out['tmp']} (deleted)", closes
    assert closes[out["gone"]]["value"] == f"{tmp_path}/gone.txt (deleted)", closes
    assert all(closes[i]["status"] == "ok" for i in (out["tmp"], out["gone"])), closes


def test_hook_choice_is_reported_with_its_reason(host: None) -> None:
    """The ladder's choice for vfs, and why the better hook was not taken where it was not."""
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions

    with BpfEngine(EngineOptions(bpf_dir=BPF_DIR, sets=("vfs",))) as eng:
        rep = eng.capabilities()["event_sets"]["vfs"]
    print(f"\nVFS hook on {os.uname().release}: {rep['strategy']}; attempts {rep['attempts']}")
    assert rep["strategy"] in HOOKS
    first = rep["attempts"][0]
    assert first["strategy"] == "fentry"
    if rep["strategy"] == "tracepoint":
        assert not first["ok"] and first["reason"], rep
        assert "fentry unavailable" in rep["reason"]
    else:
        assert first["ok"]


@pytest.mark.parametrize("hook", HOOKS)
def test_file_heavy_loop_is_counted_exactly_and_its_cost_reported(
    hook: str, tmp_path: Path
) -> None:
    """openat+close of one tmpfs file in a tight C loop (the benchmark's loop) with the vfs set
    off and on: every iteration is two records (open, close) written or counted as dropped,
    exactly; the cost per iteration and the delivered rate are printed for the issue's note
    (no timing threshold: the 7.2 guest runs under emulation)."""
    from tracefleet.agent.capture.engine import EventSetConfig, Filters

    eng = _engine(hook)
    loop = tmp_path / "tf_bench_loop"
    src = Path(__file__).resolve().parents[1] / "bench" / "loop.c"
    subprocess.run(["gcc", "-O2", "-o", str(loop), str(src)], check=True)
    cpu = sorted(os.sched_getaffinity(0))[-1]
    with mounted("tmpfs", tmp_path) as root:
        target = str(root / "f")

        def run(seconds: str = "1") -> tuple[dict[str, Any], int, int]:
            k0 = eng.kernel_counters("vfs")
            out = subprocess.run(["taskset", "-c", str(cpu), str(loop), "openat", target,
                                  seconds], capture_output=True, text=True, check=True)  # fmt: skip
            k1 = eng.kernel_counters("vfs")
            line = out.stdout.strip().splitlines()[-1]  # no iterations: printf gives nan
            res = dict(json.loads(line.replace("-nan", "NaN").replace("nan", "NaN")))
            return res, k1["events"] - k0["events"], k1["dropped"] - k0["dropped"]

        off, _, _ = run()
        # enabled without an event reader, as an agent that only sends aggregates runs
        st = eng.apply({"vfs": EventSetConfig("vfs", True, Filters(comms=("tf_bench_loop",)))})
        assert [s for s in st if s.name == "vfs" and s.enabled], st
        try:
            # a run of no iterations: what the loop's start (dynamic loader, O_CREAT) opens
            idle, setup, setup_dropped = run("0")
            on, written, dropped = run()
        finally:
            eng.apply({})
    assert idle["iters"] == 0 and setup + setup_dropped > 0
    assert written + dropped - (setup + setup_dropped) == 2 * on["iters"], (on, written, dropped)
    ns_off = off["cpu_ns"] / off["iters"]
    ns_on = on["cpu_ns"] / on["iters"]
    print(
        f"\nVFS cost {hook} on {os.uname().release}: open+close untraced {ns_off:.0f} ns, "
        f"with vfs {ns_on:.0f} ns ({ns_on / ns_off:.2f}x, +{(ns_on - ns_off) / 2:.0f} ns per "
        f"syscall); {written / (on['ns'] / 1e9):.0f} records/s written, {dropped} dropped "
        f"(ring full: the Python consumer drains slower than the loop writes)"
    )
