"""The compiled jsonl formatter (agent/native/jsonfmt.c) against the model's line
(jsonfmt.python_line: Event.to_json + json.dumps) on made-up syscall records: every byte
value in a path and in comm, random byte strings (invalid UTF-8, truncated sequences,
surrogates, overlongs), random flag values, lost and unknown-errno arguments, open_how, the
executable (a cached path of every byte value; unknown: null, counted as ExeResolver does).
No root: the formatter is called on records, not on a ring. The library is built by
`make native` (part of `make workloads`): missing, this fails."""

from __future__ import annotations

import ctypes
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from tracefleet.agent.capture import fastring
from tracefleet.agent.capture.decode import decode_record, encode_record
from tracefleet.agent.capture.exe import ExeResolver
from tracefleet.agent.capture.jsonfmt import JsonFormatter, python_line
from tracefleet.agent.kernel.abi import EventSetId, Kind, Status, Syscall, TfEvent, TfStr

TF_SET_FILE, TF_SET_NET = int(EventSetId.FILE), int(EventSetId.NET)

OFFSET = 1_764_000_000_123_456_789
NOW = 9_000_000_000
IDENT = {"node": 'n"\\ode\x01é', "attribution": "pod", "container_id": "c1", "pod": "p",
         "namespace": "ns", "pod_uid": "u", "container": "db"}  # fmt: skip


@pytest.fixture
def fmt() -> Iterator[JsonFormatter]:
    lib = fastring.library()
    assert lib is not None, f"libtfring.so does not load: {fastring.consumer_status()[1]}"
    fd = os.open(os.devnull, os.O_WRONLY)
    jf = JsonFormatter(lib, fd, need_ident=True, self_check=False)
    jf.set_offset(OFFSET)
    yield jf
    jf.close()
    os.close(fd)


def record(syscall: Syscall = Syscall.OPENAT, path: bytes = b"/etc/hostname",
           comm: bytes = b"cat", **kw: Any) -> bytes:  # fmt: skip
    e = TfEvent()
    h = e.hdr
    h.ts_ns, h.exit_ns = kw.get("ts", 5_000_000_000), kw.get("exit", 5_000_001_234)
    h.cgroup_id, h.ret, h.pid, h.tid = kw.get("cg", 77), kw.get("ret", 3), 42, 43
    h.kind, h.syscall, h.event_set = Kind.SYSCALL, syscall, kw.get("set", TF_SET_FILE)
    h.strategy, h.comm = kw.get("strategy", 3), comm
    h.ctx_ok, h.ppid, h.uid, h.gid = kw.get("ctx", 1), 1, 1000, 1000
    h.exe_ino, h.exe_dev, h.exe_gen = kw.get("exe", (0, 0, 0))
    for i, v in enumerate(kw.get("iargs", (-100, 0, 0o2100101, 0o644, 0, 0))):
        e.iargs[i] = v
    for i, (data, status, err) in enumerate(
        [(path, kw.get("status", Status.OK), kw.get("err", 0)), *kw.get("more", [])]
    ):
        s = e.str[i] if i < 2 else e.blob
        s.uptr, s.status, s.strategy, s.err, s.len = 0x7FFC0000 + i, status, 3, err, len(data)
        ctypes.memmove(ctypes.addressof(s) + TfStr.data.offset, data, len(data))
    return encode_record(e)


def both(jf: JsonFormatter, raw: bytes, exe: str | None = None) -> tuple[bytes | None, bytes]:
    """The compiled line and the model's, ``exe`` being what the consumer resolved."""
    jf.add_ident(77, IDENT)
    ev, _ = decode_record(raw, NOW)
    ev["time_ns"] = ev["ts_ns"] + OFFSET
    ev["exe"] = exe
    ev.update(IDENT)
    return jf.line(raw, NOW), python_line(ev)


def test_every_byte_in_a_path_and_comm(fmt: JsonFormatter) -> None:
    for b in range(256):
        path = b"/x/" + bytes([b]) * 3 + b"/y"
        comm = bytes([b]) if b else b"z"
        got, want = both(fmt, record(path=path, comm=comm))
        assert got == want, (b, got, want)


def test_random_bytes_paths(fmt: JsonFormatter) -> None:
    rng = random.Random(14)
    pieces = [b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80", b"\xc0\xaf",
              b"\xe0\x80\xaf", b"\xf4\x90\x80\x80", b"\xf0\x90", b"\xe2\x82", b"\x80", b"\xff",
              b'"', b"\\", b"\n", b"\x00", b"\x7f", b"a"]  # fmt: skip
    for _ in range(3000):
        if rng.random() < 0.5:
            path = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 255)))
        else:
            path = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 60)))[:255]
        got, want = both(fmt, record(path=path))
        assert got == want, (path, got, want)


def test_flags_ints_and_header_values(fmt: JsonFormatter) -> None:
    rng = random.Random(7)
    calls = [Syscall.OPENAT, Syscall.OPEN, Syscall.UNLINKAT, Syscall.RENAMEAT2, Syscall.STATX,
             Syscall.NEWFSTATAT, Syscall.MKDIRAT, Syscall.TRUNCATE, Syscall.CHDIR]  # fmt: skip
    for _ in range(3000):
        sc = rng.choice(calls)
        iargs = tuple(rng.choice([rng.getrandbits(64) - (1 << 63), rng.getrandbits(32),
                                  rng.getrandbits(12), -100, 0]) for _ in range(6))  # fmt: skip
        ts = rng.getrandbits(50)
        kw = dict(iargs=iargs, ts=ts, exit=rng.choice([0, ts + rng.getrandbits(20), ts - 5]),
                  ret=rng.getrandbits(64) - (1 << 63), ctx=rng.getrandbits(1))  # fmt: skip
        more = [(b"/new\xff", Status.OK, 0)] if sc == Syscall.RENAMEAT2 else []
        got, want = both(fmt, record(sc, b"/a b", more=more, **kw))
        assert got == want, (sc, got, want)


def test_lost_truncated_kernel_path_and_errors(fmt: JsonFormatter) -> None:
    cases = [
        dict(status=Status.LOST, err=-14),
        dict(status=Status.LOST, err=-4000),  # no errno name: the number as text
        dict(status=Status.LOST, err=5),  # not an error code: no "error"
        dict(status=Status.TRUNCATED),
        dict(status=Status.TORN),
        dict(status=Status.RECOVERED, more=[(b"/etc/hostname", Status.OK, 0)]),
        dict(status=Status.MISMATCH, more=[(b"/etc/\xffother", Status.OK, 0)]),
        dict(status=Status.LOST, err=-14, more=[(b"", Status.LOST, -2)]),
        dict(status=Status.NONE),
    ]
    for kw in cases:
        got, want = both(fmt, record(path=b"/p", **kw))
        assert got == want, (kw, got, want)


def test_open_how(fmt: JsonFormatter) -> None:
    how = (
        (0o2100101).to_bytes(8, "little")
        + (0o600).to_bytes(8, "little")
        + (1 << 63).to_bytes(8, "little")
    )
    for status in (Status.OK, Status.REREAD, Status.LOST, Status.NONE):
        more = [(b"", Status.NONE, 0), (how, status, -14 if status == Status.LOST else 0)]
        got, want = both(fmt, record(Syscall.OPENAT2, iargs=(-100, 0, 0, 24, 0, 0), more=more))
        assert got == want, (status, got, want)


def test_left_to_python_and_counted(fmt: JsonFormatter) -> None:
    """What it cannot render as the model does is declined, never rendered otherwise."""
    short_how = [(b"", Status.NONE, 0), (b"\x01\x02", Status.OK, 0)]
    assert fmt.line(record(Syscall.OPENAT2, more=short_how), NOW) is None  # model's own text
    assert fmt.line(record(Syscall.CONNECT, set=TF_SET_NET), NOW) is None  # socket address
    assert fmt.line(record(cg=999), NOW) is None  # workload fields not settled
    assert fmt.line(record(strategy=30), NOW) is None  # no such strategy
    assert fmt.line(record()[:-1], NOW) is None  # malformed


def test_exe_paths_every_byte_and_random(fmt: JsonFormatter) -> None:
    """A cached executable's path (as tf_exes has it) is the model's exe, byte for byte."""
    rng = random.Random(96)
    paths = [b"/usr/bin/" + bytes([b]) * 2 + b" (deleted)" for b in range(256)]
    paths += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 255))) for _ in range(500)]
    paths.append(b"/" + b"x" * 254)  # the longest the kernel stores (TF_PATH_MAX - 1)
    for i, path in enumerate(paths):
        ident = (1000 + i, 0xFD00000 + i % 7, i)
        fmt.seed_exe(ident, path)
        got, want = both(fmt, record(exe=ident), exe=path.decode("utf-8", "backslashreplace"))
        assert got == want, (path, got, want)
        assert b'"exe":null' not in (got or b"")


def test_exe_unknown_is_null_and_counted_as_exe_resolver_counts() -> None:
    """No map (fd -1): a kernel thread's record (inode 0) and an identity not cached render
    "exe":null, and the causes counted are ExeResolver's for the same headers. A declined
    record counts nothing here (Python resolves and counts it)."""
    lib = fastring.library()
    assert lib is not None, fastring.consumer_status()[1]
    fd = os.open(os.devnull, os.O_WRONLY)
    jf = JsonFormatter(lib, fd, need_ident=True, self_check=True, exe_fd=-1)
    jf.set_offset(OFFSET)
    ref = ExeResolver(-1)
    try:
        idents = [(0, 0, 0), (5, 1, 2), (0, 9, 9), (77, 3, 0), (5, 1, 2)]
        for ident in idents:
            raw = record(exe=ident)
            _, rec = decode_record(raw, NOW)
            exe = ref.path(rec.hdr)
            assert exe is None
            got, want = both(jf, raw, exe=exe)
            assert got == want, (ident, got, want)
            assert b'"exe":null,' in want
        assert jf.line(record(cg=999, exe=(0, 0, 0)), NOW) is None  # declined: not counted
        assert jf.line(record(cg=999, exe=(5, 1, 2)), NOW) is None
        assert jf.exe_counters()[0] == ref.counts() == {"no-mm": 2, "not-in-map": 3}
        assert jf.exe_counters()[1] == 0  # no map: no lookup made
    finally:
        jf.close()
        os.close(fd)
