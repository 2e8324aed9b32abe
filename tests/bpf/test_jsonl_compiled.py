"""`capture -o jsonl` with the compiled formatter (agent/native/jsonfmt.c) on the real kernel:

- the records of a real workload (hostile paths: invalid UTF-8, quotes, backslashes, a
  newline, control bytes; a lost argument: a pointer the kernel cannot read), taken from the
  ring, are rendered by the compiled formatter and by the Python model, and the lines must
  be the same bytes, the executable resolved by each from the engine's own tf_exes map (the
  model's exe by capture/exe.py's ExeResolver), and it must be the workload's interpreter;
- a tf_exes map filled by hand (a path, a TRUNCATED one, another status, an absent identity,
  a kernel thread): the same exe or null in both lines, the same causes counted;
- the CLI end to end, with the compiled formatter and with libtfring.so missing (the Python
  consumer: slower, and it says so): the same lines for the workload's calls, exe included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BPF_DIR, scaled, wait_until
from tracefleet.agent.capture.engine import EventSetConfig, Filters

pytestmark = pytest.mark.bpf

# the workload: opens of hostile names (created, so some succeed), then a pathname pointer
# the kernel cannot read (EFAULT: the argument is lost), then exit
HOSTILE = [b"bad\xff\xfeutf8", b'q"uote', b"back\\slash", b"new\nline", b"ctl\x01\x1f\x7f",
           b"caf\xc3\xa9", b"trunc\xe2\x82", b"emoji\xf0\x9f\x98\x80"]  # fmt: skip
WORKLOAD = r"""
import ctypes, os, sys, time
HOSTILE = eval(sys.argv[2])
d = os.fsencode(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, b'tf"w\\\xff\x01', 0, 0, 0)  # PR_SET_NAME: a hostile comm too
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
os.close(os.open("/etc/hostname", os.O_RDONLY))  # the first record of a cgroup is Python's:
time.sleep(0.5)  # it hands the workload fields over, for the lines after it
for name in HOSTILE:
    fd = os.open(d + b"/" + name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    os.close(fd)
    try:
        os.open(d + b"/missing-" + name, os.O_RDONLY)
    except OSError:
        pass
libc.syscall(257, -100, ctypes.c_void_p(8), 0, 0)  # openat(AT_FDCWD, (char *)8, 0): EFAULT
"""


def _workload(tmp: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", WORKLOAD, str(tmp), repr(HOSTILE)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_compiled_lines_are_the_models_bytes(host: None, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from tracefleet.agent.capture import fastring
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.capture.consumer import RingConsumer
    from tracefleet.agent.capture.decode import decode_record
    from tracefleet.agent.capture.exe import ExeResolver
    from tracefleet.agent.capture.jsonfmt import JsonFormatter, python_line

    raws: list[tuple[bytes, int]] = []
    on_record = RingConsumer.on_record

    def keep(self: RingConsumer, raw: bytes, now: int = 0, flags: int = -1) -> None:
        raws.append((bytes(raw), now))
        on_record(self, raw, now, flags)

    monkeypatch.setattr(RingConsumer, "on_record", keep)  # the records as the ring had them
    # every record through on_record (the compiled decode would hand over dicts instead)
    eng = BpfEngine(EngineOptions(bpf_dir=BPF_DIR, hold_seconds=3600, sets=("file",),
                                  compiled_decode=False))  # fmt: skip
    try:
        assert eng.consumer()[0], eng.consumer()
        eng.ensure_loaded("file")
        eng.start()
        events: list[dict[str, Any]] = []
        eng.add_sink(events.append)  # every record is handed over
        proc = _workload(tmp_path)
        eng.apply({"file": EventSetConfig("file", True, Filters(pids=(proc.pid,)))})
        proc.communicate("go\n", timeout=scaled(60))
        k = eng.kernel_counters("file")
        wait_until(lambda: len(raws) >= k["events"], timeout=scaled(30),
                   what=f"the kernel's {k['events']} records")  # fmt: skip
        eng.apply({})
        # compared while the engine's tf_exes map is open: C and ExeResolver both read it
        lib = fastring.library()
        assert lib is not None
        fd = os.open(os.devnull, os.O_WRONLY)
        jf = JsonFormatter(lib, fd, need_ident=True, self_check=False, exe_fd=eng.shared.exes)
        ref = ExeResolver(eng.shared.exes)
        ident = {"node": "node\"1", "attribution": "host", "container_id": "", "pod": "",
                 "namespace": "", "pod_uid": "", "container": ""}  # fmt: skip
        offset = 1_764_000_000_000_000_000
        jf.set_offset(offset)
        seen_hostile, seen_lost, compared, exes = set(), 0, 0, set()
        try:
            for raw, now in raws:
                ev, rec = decode_record(raw, now)
                jf.add_ident(ev["cgroup_id"], ident)
                ev["time_ns"] = ev["ts_ns"] + offset
                ev["exe"] = ref.path(rec.hdr)
                ev.update(ident)
                want = python_line(ev)
                got = jf.line(raw, now)
                assert got == want, f"compiled:\n{got!r}\nmodel:\n{want!r}"
                compared += 1
                exes.add(ev["exe"])
                path = ev["args"].get("pathname", {})
                for name in HOSTILE:
                    if path.get("value") and path["value"].endswith(
                        name.decode(errors="backslashreplace")
                    ):
                        seen_hostile.add(name)
                seen_lost += path.get("status") == "lost"
            assert jf.exe_counters()[0] == ref.counts()
        finally:
            jf.close()
            os.close(fd)
    finally:
        eng.close()
    assert exes == {os.path.realpath(sys.executable)}, exes  # the workload's interpreter
    assert seen_hostile == set(HOSTILE), set(HOSTILE) - seen_hostile
    assert seen_lost >= 1, "no lost argument among the records"
    assert compared >= 2 * len(HOSTILE) + 1


def test_exe_from_a_filled_map_as_exe_resolver(host: None) -> None:
    """tf_exes filled by hand: each identity renders the exe ExeResolver gives (a path with
    hostile bytes, null for TRUNCATED, another status, an absent identity, a kernel thread),
    the causes and the lookups counted alike; a cached path survives its map entry."""
    import ctypes

    from tracefleet.agent.capture import fastring
    from tracefleet.agent.capture.decode import decode_record, encode_record
    from tracefleet.agent.capture.exe import ExeResolver
    from tracefleet.agent.capture.jsonfmt import JsonFormatter, python_line
    from tracefleet.agent.kernel import libbpf
    from tracefleet.agent.kernel.abi import (
        EventSetId,  # fmt: skip
        Kind,
        Status,
        Syscall,
        TfEvent,
        TfExeKey,
        TfStr,
    )

    mfd = libbpf.map_create(libbpf.BPF_MAP_TYPE_LRU_HASH, "tf_exes", ctypes.sizeof(TfExeKey),
                            ctypes.sizeof(TfStr), 64)  # fmt: skip
    entries = {(11, 2, 3): (b'/opt/b\xffin/"x\\\n (deleted)', Status.OK),
               (12, 2, 3): (b"/opt/" + b"y" * 250, Status.TRUNCATED),
               (13, 2, 0): (b"/torn", Status.TORN)}  # fmt: skip
    for key, (path, status) in entries.items():
        v = TfStr()
        v.len, v.status = len(path), int(status)
        ctypes.memmove(ctypes.addressof(v) + TfStr.data.offset, path, len(path))
        libbpf.map_update(mfd, TfExeKey(*key), v)
    lib = fastring.library()
    assert lib is not None
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        jf = JsonFormatter(lib, fd, need_ident=False, self_check=True, exe_fd=mfd)
        jf.set_offset(1_764_000_000_000_000_000)
        ref = ExeResolver(mfd)
        idents = [*entries, (14, 2, 3), (0, 0, 0), (11, 2, 3), (11, 2, 4)]
        seen = []
        try:
            for i, ident in enumerate(idents):
                if i == len(idents) - 2:  # gone from the map: both still have it cached
                    libbpf.map_delete(mfd, TfExeKey(*ident))
                e = TfEvent()
                e.hdr.ts_ns, e.hdr.kind, e.hdr.syscall = 1000 + i, Kind.SYSCALL, Syscall.OPENAT
                e.hdr.event_set, e.hdr.strategy, e.hdr.comm = EventSetId.FILE, 3, b"c"
                e.hdr.exe_ino, e.hdr.exe_dev, e.hdr.exe_gen = ident
                raw = encode_record(e)
                ev, rec = decode_record(raw, 5000)
                ev["exe"] = ref.path(rec.hdr)
                ev["time_ns"] = ev["ts_ns"] + 1_764_000_000_000_000_000
                seen.append(ev["exe"])
                got, want = jf.line(raw, 5000), python_line(ev)
                assert got == want, (ident, got, want)
            assert jf.exe_counters() == (ref.counts(), ref.lookups)
        finally:
            jf.close()
    finally:
        os.close(fd)
        os.close(mfd)
    shown = entries[(11, 2, 3)][0].decode("utf-8", "backslashreplace")
    assert seen == [shown, None, None, None, None, shown, None], seen
    assert ref.counts() == {"truncated": 1, "not-in-map": 3, "no-mm": 1}


def _capture(tmp: Path, env: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
    proc = _workload(tmp)
    ready = tmp / "ready"
    out = tmp / "out.jsonl"
    cmd = [sys.executable, "-m", "tracefleet.agent.cli", "capture", "-e", "file", "--pid",
           str(proc.pid), "-o", "jsonl", "--ready-file", str(ready)]  # fmt: skip
    with open(out, "wb") as f:
        agent = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, env={**os.environ, **env})
    try:
        wait_until(lambda: ready.exists() or agent.poll() is not None, timeout=scaled(60),
                   what="the agent to start")  # fmt: skip
        proc.communicate("go\n", timeout=scaled(60))
        agent.send_signal(2)
        _, err = agent.communicate(timeout=scaled(60))
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, err
    return [json.loads(x) for x in out.read_bytes().splitlines()], err.decode(errors="replace")


def _calls(lines: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What does not depend on the run: the call, its path, ret, flags and statuses."""
    return sorted(
        (ev["syscall"], ev["comm"], ev["exe"], ev["ret"],
         json.dumps(ev["args"]["pathname"]["value"]),
         ev["args"]["pathname"]["status"], tuple(ev["args"].get("flags", {}).get("names", [])))
        for ev in lines if ev["syscall"] == "openat" and "/" + "missing" not in "x"
    )  # fmt: skip


def test_cli_jsonl_compiled_and_without_the_library(host: None, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fast, fast_err = _capture(tmp_path / "a", {})
    slow, slow_err = _capture(tmp_path / "b", {"TRACEFLEET_FASTRING": str(tmp_path / "none.so")})
    counts = json.loads(fast_err.split("  jsonl: ", 1)[1].splitlines()[0])
    assert counts["compiled"] > 0, fast_err  # the compiled formatter wrote lines
    assert "jsonl:" not in slow_err
    assert "Python (one call per record)" in slow_err and "not built" in slow_err, slow_err
    names = {ev["args"]["pathname"]["value"] for ev in fast if ev["syscall"] == "openat"}
    for name in HOSTILE:
        shown = name.decode(errors="backslashreplace")
        assert any(n and n.endswith("/" + shown) for n in names), (shown, names)
    norm_a = [c for c in _calls(fast)]
    norm_b = [c for c in _calls(slow)]
    # paths differ only by the directory (a vs b)
    assert {c[2] for c in norm_a} == {os.path.realpath(sys.executable)}, norm_a  # exe
    assert [(*c[:4], c[4].replace("/a/", "/X/"), *c[5:]) for c in norm_a] == [
        (*c[:4], c[4].replace("/b/", "/X/"), *c[5:]) for c in norm_b
    ]
