"""Each event set reports the syscalls a user's programs make, with decoded arguments, and
the in-kernel filters keep out what they should."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import scaled
from tracefleet.agent.capture.engine import Filters

pytestmark = pytest.mark.bpf


def spawn(script: str) -> subprocess.Popen[str]:
    """A child that waits for a line on stdin, then runs ``script`` (so filters can name its
    pid before it acts)."""
    code = "import sys; sys.stdin.readline()\n" + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)


def go(proc: subprocess.Popen[str]) -> None:
    proc.communicate("go\n", timeout=scaled(30))
    assert proc.returncode == 0


def test_file_syscalls_with_their_paths(capture, tmp_path: Path):
    d = tmp_path / "d"
    proc = spawn(f"""
        import os
        d = {str(d)!r}
        os.mkdir(d)                                   # mkdir
        fd = os.open(d + "/a", os.O_CREAT | os.O_WRONLY, 0o600)  # openat
        os.close(fd)
        os.rename(d + "/a", d + "/b")                 # rename
        os.chmod(d + "/b", 0o644)                     # chmod
        os.truncate(d + "/b", 10)                     # truncate
        os.stat(d + "/b")                             # newfstatat
        os.symlink(d + "/b", d + "/l")
        os.readlink(d + "/l")                         # readlink
        os.unlink(d + "/l")                           # unlink
        os.unlink(d + "/b")
        os.rmdir(d)                                   # rmdir
    """)
    cap = capture(["file"], filters=Filters(pids=(proc.pid,)))
    go(proc)
    evs = cap.wait_for(lambda e: e["pid"] == proc.pid and e["syscall"] == "rmdir")
    assert evs
    seen = {(e["syscall"], tuple(a["value"] for k, a in e["args"].items()
                                 if a["strategy"] != "register")) for e in cap.events
            if e["pid"] == proc.pid}  # fmt: skip
    d_ = str(d)
    for want in [
        ("mkdir", (d_,)),
        ("openat", (d_ + "/a",)),
        ("rename", (d_ + "/a", d_ + "/b")),
        ("chmod", (d_ + "/b",)),
        ("truncate", (d_ + "/b",)),
        ("newfstatat", (d_ + "/b",)),
        ("readlink", (d_ + "/l",)),
        ("unlink", (d_ + "/b",)),
        ("rmdir", (d_,)),
    ]:
        assert want in seen, f"{want} missing from {sorted(seen)}"
    assert all(e["pid"] == proc.pid for e in cap.events), "pid filter let others through"


@pytest.mark.parametrize("event_set", ["file", "vfs"])
def test_events_carry_the_callers_real_uid_and_gid(capture, event_set: str):
    # a service dropped to its own user: who made the call, as `ps -o ruid,rgid` shows it
    # (the real ids: the effective ones differ here, as in a setuid program)
    f = "/etc/passwd"  # readable by any user (pytest's tmp_path is not)
    proc = spawn(f"""
        import os
        os.setgroups([])
        os.setresgid(5678, 8765, 8765)
        os.setresuid(1234, 4321, 4321)
        os.close(os.open({f!r}, os.O_RDONLY))
    """)
    cap = capture([event_set], filters=Filters(pids=(proc.pid,)))
    go(proc)
    call = "openat" if event_set == "file" else "vfs_open"
    evs = cap.wait_for(lambda e: e["pid"] == proc.pid and e["syscall"] == call
                       and f in str(e["args"]), timeout=10)  # fmt: skip
    assert evs, f"no {call} of {f} from pid {proc.pid}"
    assert [(e["uid"], e["gid"]) for e in evs] == [(1234, 5678)] * len(evs)


def test_net_syscalls_with_decoded_addresses(capture):
    proc = spawn("""
        import socket
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
        port = srv.getsockname()[1]
        c = socket.socket(); c.connect(("127.0.0.1", port))
        conn, _ = srv.accept()
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.sendto(b"x", ("::1", 9))
        print(port, c.getsockname()[1], file=open("/dev/null", "w"))
    """)
    cap = capture(["net"], filters=Filters(pids=(proc.pid,)))
    go(proc)
    evs = cap.wait_for(lambda e: e["pid"] == proc.pid and e["syscall"] == "sendto")
    assert evs
    mine = [e for e in cap.events if e["pid"] == proc.pid]
    by = {e["syscall"]: e for e in mine}
    assert by["bind"]["args"]["addr"]["value"] == {"family": "inet", "address": "127.0.0.1",
                                                   "port": 0}  # fmt: skip
    conn = by["connect"]["args"]["addr"]["value"]
    assert conn["family"] == "inet" and conn["address"] == "127.0.0.1" and conn["port"] > 0
    peer = by["accept4"]["args"]["peer"]  # written by the kernel, read at exit
    assert peer["status"] == "ok" and peer["value"]["address"] == "127.0.0.1"
    assert peer["value"]["port"] not in (0, conn["port"])
    assert by["sendto"]["args"]["addr"]["value"] == {"family": "inet6", "address": "::1",
                                                     "port": 9}  # fmt: skip


def test_paths_of_every_length_are_captured_whole_or_marked_truncated(capture):
    # A path is read onto the stack when it fits 128 bytes and again into place when not
    # (common.bpf.h tf_probe_user_str): each length at and around those edges, and at the
    # limit (TF_PATH_MAX - 1 bytes), comes back byte for byte, a longer one marked truncated.
    from tracefleet.agent.kernel.abi import TF_PATH_MAX

    most = TF_PATH_MAX - 1  # a path's bytes, its NUL aside
    base = "/proc/tf-nonexistent-dir/"
    lengths = (1, 7, 8, 9, 119, 120, 126, 127, 128, 129, 200, most - 1, most, most + 1, 300)
    filler = "".join(chr(97 + i % 26) for i in range(300))
    # each one distinct in its first bytes (a truncated one too); the short ones relative
    paths = {n: ((base if n > 40 else "") + f"L{n}-" + filler)[:n] for n in lengths}
    assert all(len(p) == n for n, p in paths.items()) and len(set(paths.values())) == len(paths)
    proc = spawn(f"""
        import os
        for p in {list(paths.values())!r} + ["/proc/tf-nonexistent-dir/end"]:
            try: os.stat(p)
            except OSError: pass
    """)
    cap = capture(["file"], filters=Filters(pids=(proc.pid,)))
    go(proc)
    cap.wait_for(lambda e: e["pid"] == proc.pid
                 and e["args"].get("pathname", {}).get("value", "").endswith("/end"))  # fmt: skip
    got = [e["args"]["pathname"] for e in cap.events
           if e["pid"] == proc.pid and e["syscall"] == "newfstatat"]  # fmt: skip
    for n, p in paths.items():
        want = ("ok", p) if n <= most else ("truncated", p[:most])
        assert [(a["status"], a["value"]) for a in got if a["value"] == want[1]] == [want], n


def test_exec_argv_and_truncation_marked(capture):
    long_arg = "y" * 300
    proc = spawn(f"""
        import os
        os.execv("/bin/true", ["/bin/true", "short", {long_arg!r}] + ["n"] * 20)
    """)
    cap = capture(["exec"], filters=Filters(pids=(proc.pid,)))
    go(proc)
    [ev] = cap.wait_for(lambda e: e["pid"] == proc.pid and e["syscall"] == "execve"
                        and e["args"]["filename"]["value"] == "/bin/true")  # fmt: skip
    assert ev["args"]["filename"]["value"] == "/bin/true"
    argv = ev["args"]["argv"]
    assert argv["status"] == "truncated"
    assert argv["value"][:2] == ["/bin/true", "short"]
    assert argv["value"][2] == "y" * 127  # TF_ARG_MAX - 1
    assert len(argv["value"]) == 16  # TF_ARGV_COUNT


def test_path_prefix_and_comm_filters_in_kernel(capture, tmp_path: Path):
    # stat()s of paths nobody can create (procfs root), not of a world-writable /tmp; a
    # private engine (an option given): its kernel counters start at zero and count only
    # what its own programs did, not what earlier tests raised on the shared engine
    nowhere = "/proc/tf-nonexistent-dir"
    cap = capture(["file"], filters=Filters(comms=("tf-filter-yes",),
                                            path_prefixes=(f"{nowhere}/tfp-",)),
                  poll_ms=20)  # fmt: skip
    script = """
        import ctypes, os
        ctypes.CDLL(None).prctl(15, {name!r}, 0, 0, 0)  # PR_SET_NAME
        for p in ({nowhere!r} + "/tfp-in", {nowhere!r} + "/other-out"):
            try: os.stat(p)
            except OSError: pass
    """
    yes = spawn(script.format(name=b"tf-filter-yes", nowhere=nowhere))
    no = spawn(script.format(name=b"tf-filter-no", nowhere=nowhere))
    go(yes)
    go(no)
    evs = cap.wait_for(lambda e: e["pid"] == yes.pid, timeout=2.0)
    paths = {e["args"]["pathname"]["value"] for e in evs}
    assert paths == {f"{nowhere}/tfp-in"}
    assert not [e for e in cap.events if e["pid"] == no.pid]
    # filtered in the kernel: the one matching stat is the only record this engine wrote
    # (everything else, the other process and the other path included, counted as filtered)
    counters = cap.engine.kernel_counters("file")
    assert (counters["events"], counters["dropped"]) == (1, 0), counters
    assert counters["filtered"] >= 3, counters


def test_comm_filter_matches_whole_names_only(capture):
    # the kernel compares comms as two 64-bit words (common.bpf.h tf_comm_match): a name is
    # matched whole, never as a prefix either way, up to the kernel's 15 bytes
    nowhere = "/proc/tf-nonexistent-dir"
    want = ("tf-cm-15bytes-x", "tf-cm-b", "t")
    cap = capture(["file"], filters=Filters(comms=want), poll_ms=20)
    # the names that must not match run first: once the last wanted name's event is in,
    # any event of theirs (a wrong match) was consumed before it and would be seen
    names = ("tf-cm-15bytes-", "tf-cm-bb", "tf-cm-", "tt", *want)
    script = """
        import ctypes, os
        ctypes.CDLL(None).prctl(15, {name!r}, 0, 0, 0)  # PR_SET_NAME
        try: os.stat({nowhere!r} + "/" + {name!r}.decode())
        except OSError: pass
    """
    procs = {n: spawn(script.format(name=n.encode(), nowhere=nowhere)) for n in names}
    for p in procs.values():
        go(p)
    cap.wait_for(lambda e: e["comm"] == "tf-cm-b", timeout=2.0)
    cap.wait_for(lambda e: e["comm"] == "t", timeout=2.0)
    seen = {n for n, p in procs.items() for e in list(cap.events) if e["pid"] == p.pid}
    assert seen == set(want)
    stats = {e["comm"] for e in cap.events
             if e["args"].get("pathname", {}).get("value", "").startswith(nowhere)}  # fmt: skip
    assert stats == set(want)
