"""The compiled decode on the real kernel's records: every event a sink receives from the
compiled decode (cdecode, agent/native/pydecode.c) equals the event the Python decode path
makes of the same record (decode_record, the executable from ExeResolver, the same wall
clock offset), key order and types included; the records it leaves to Python are the ones it
should (lost arguments for the fallback, ...), and they reach the sink too.

The workload: one process (pid filter) that opens, renames and stats files with hostile
names (invalid UTF-8, quotes, control bytes), connects and sends to IPv4, IPv6 and unix
(path and abstract) addresses, then execs with argv; the file, net and exec sets on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BPF_DIR, scaled, wait_until
from tests.unit.test_cdecode import same
from tracefleet.agent.capture import decode
from tracefleet.agent.capture.engine import EventSetConfig, Filters

pytestmark = pytest.mark.bpf

SETS = ("file", "net", "exec")


def _workload(tmp: Path) -> subprocess.Popen[str]:
    code = "import sys; sys.stdin.readline()\n" + textwrap.dedent(f"""
        import os, socket
        d = {str(tmp).encode()!r}
        for name in (b"plain", b"bad-\\xff\\xfe", b'q"uo\\\\te\\n\\x01', "é😀".encode()):
            p = d + b"/" + name
            fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.stat(p)
            os.rename(p, p + b".r")
            os.unlink(p + b".r")
        for i in range(200):
            try:
                os.open(d + b"/missing-%d" % i, os.O_RDONLY)
            except FileNotFoundError:
                pass
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
        c = socket.socket(); c.connect(srv.getsockname()); srv.accept()
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.sendto(b"x", ("::1", 9))
        for addr in (d + b"/sock", b"\\0tf-abstract"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.connect(addr)
            except OSError:
                pass
        os.execv("/bin/true", ["/bin/true", "a\\x01b", "é", "x" * 200])
    """)  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)


def test_sink_events_equal_python_decode(host: None, tmp_path: Path) -> None:
    from tracefleet.agent.capture import fastring
    from tracefleet.agent.capture.bpfengine import BpfEngine, EngineOptions
    from tracefleet.agent.capture.exe import ExeResolver

    eng = BpfEngine(EngineOptions(bpf_dir=BPF_DIR, hold_seconds=3600, sets=SETS,
                                  compiled_consumer=True, compiled_decode=True))  # fmt: skip
    try:
        assert eng.consumer()[0], eng.consumer()[1]
        for name in SETS:
            eng.ensure_loaded(name)
        rb = eng._rb
        assert isinstance(rb, fastring.FastRing) and rb.decoder is not None, eng.decode()
        assert eng.decode()[0], eng.decode()[1]
        # each slice the compiled decode makes: its records (raw, receive time), its items
        # and the wall clock offset it used
        seen: list[tuple[bytes, int, Any, int]] = []
        lock = threading.Lock()
        dec = rb.decoder
        real = dec.decode_batch

        def spy(address: int, length: int, deliver: bool, start: int = 0, *a: Any) -> Any:
            import ctypes
            import struct

            items, sampled, nxt = real(address, length, deliver, start, *a)
            offset = decode.WALL_CLOCK.offset  # what offset_at returned in the call
            data = ctypes.string_at(address + start, nxt - start)
            off, recs = 0, []
            while off < len(data):
                n, _flags, now = struct.unpack_from("=IIQ", data, off)
                recs.append((data[off + 16 : off + 16 + n], now))
                off += 16 + ((n + 7) & ~7)
            assert len(recs) == len(items)  # deliver: every record is an item
            with lock:
                seen.extend(
                    (raw, now, item, offset) for (raw, now), item in zip(recs, items, strict=True)
                )
            return items, sampled, nxt

        dec.decode_batch = spy  # type: ignore[method-assign]
        got: list[dict[str, Any]] = []
        eng.add_sink(got.append)
        eng.start()
        proc = _workload(tmp_path)
        eng.apply({n: EventSetConfig(n, True, Filters(pids=(proc.pid,))) for n in SETS})
        proc.communicate("go\n", timeout=scaled(60))
        assert proc.returncode == 0
        wait_until(lambda: any(e["syscall"] == "execve" and e["pid"] == proc.pid for e in got),
                   timeout=scaled(30), what="the execve event")  # fmt: skip
        total = sum(eng.kernel_counters(n)["events"] for n in SETS)
        wait_until(lambda: len(got) >= total, timeout=scaled(30),
                   what=f"the sink to receive the kernel's {total} records")  # fmt: skip
        eng.apply({})
        counts = eng.decode_counts()
        # the reference: the Python decode path's exe, read from the kernel's tf_exes (the
        # engine still open) by a resolver of its own
        exes = ExeResolver(eng.exes.fd)
        ref = [(decode.decode_record(raw, now), offset) for raw, now, item, offset in seen
               if isinstance(item, dict)]  # fmt: skip
        for (want, rec), _ in ref:
            want["exe"] = exes.path(rec.hdr)
    finally:
        eng.close()

    decoded = {id(item) for _, _, item, _ in seen if isinstance(item, dict)}
    items = [item for _, _, item, _ in seen if isinstance(item, dict)]
    compared = 0
    for item, ((want, _), offset) in zip(items, ref, strict=True):
        want["time_ns"] = want["ts_ns"] + offset
        same(item, want)
        compared += 1
    assert any(e["exe"] for e in items), "no executable resolved"
    # the sink got every decoded dict, and the records left to Python as Python's events
    assert sum(id(e) in decoded for e in got) == compared
    mine = [e for e in got if e["pid"] == proc.pid]
    syscalls = {e["syscall"] for e in mine}
    assert {"openat", "rename", "unlink", "connect", "sendto", "execve"} <= syscalls, syscalls
    assert any(e["args"].get("pathname", {}).get("value", "").endswith("bad-\\xff\\xfe")
               for e in mine)  # fmt: skip
    assert compared >= 200, (compared, counts)
    assert counts is not None and counts["decoded"] >= compared, counts
    assert set(counts["declined"]) <= {"fallback", "raw", "mounts"}, counts
