"""Decoding of ring buffer records and filter limits, on synthetic records."""

from __future__ import annotations

import ctypes
import socket
import struct
import time
from typing import Any

import pytest

from tracefleet.agent.capture.bpfengine import FilterError, build_filter
from tracefleet.agent.capture.decode import (
    decode_record,
    decode_sockaddr,
    encode_record,
    expand,
)
from tracefleet.agent.capture.engine import Filters, Histogram
from tracefleet.agent.capture.eventsets import UnknownEventSet, parse_event_sets
from tracefleet.agent.kernel.abi import Kind, Status, Strategy, Syscall, TfControl, TfEvent


def make_event(path: bytes, status: Status, strategy: Strategy) -> bytes:
    e = TfEvent()
    e.hdr.ts_ns = 1000
    e.hdr.pid, e.hdr.tid = 42, 43
    e.hdr.kind = Kind.SYSCALL
    e.hdr.syscall = Syscall.OPENAT
    e.hdr.event_set = 0
    e.hdr.strategy = Strategy.EXIT_RETRY
    e.hdr.comm = b"cat"
    e.hdr.ret = -2
    e.iargs[0] = 0xFFFFFF9C  # AT_FDCWD as the register holds it
    e.iargs[2] = 0o100
    s = e.str[0]
    s.uptr = 0x7000
    s.status, s.strategy = status, strategy
    if status in (Status.OK, Status.RECOVERED):
        ctypes.memmove(ctypes.addressof(s) + type(s).data.offset, path, len(path))
        s.len = len(path)
    else:
        s.err = -14
    return encode_record(e)


def test_openat_record_decodes_to_the_documented_shape():
    ev, _ = decode_record(make_event(b"/etc/passwd", Status.RECOVERED, Strategy.EXIT_RETRY), 5000)
    assert ev["syscall"] == "openat" and ev["event_set"] == "file"
    assert ev["pid"] == 42 and ev["tid"] == 43 and ev["comm"] == "cat" and ev["ret"] == -2
    assert ev["delivery_latency_ns"] == 4000
    assert ev["args"]["pathname"] == {"value": "/etc/passwd", "status": "recovered",
                                      "strategy": "exit-retry", "addr": "0x7000"}  # fmt: skip
    assert ev["args"]["flags"]["value"] == 0o100
    assert ev["args"]["dfd"]["value"] == -100


def test_lost_argument_has_no_value_and_names_the_error():
    ev, _ = decode_record(make_event(b"", Status.LOST, Strategy.NOFAULT), 5000)
    assert ev["args"]["pathname"]["value"] is None
    assert ev["args"]["pathname"]["status"] == "lost"
    assert ev["args"]["pathname"]["error"] == "EFAULT"


def test_short_record_is_rejected():
    with pytest.raises(ValueError):
        decode_record(b"\0" * 10, 0)


def test_sockaddr_families():
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 80) + socket.inet_aton("10.1.2.3")
    assert decode_sockaddr(v4) == {"family": "inet", "address": "10.1.2.3", "port": 80}
    v6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 443) + b"\0" * 4
          + socket.inet_pton(socket.AF_INET6, "::1") + b"\0" * 4)  # fmt: skip
    assert decode_sockaddr(v6) == {"family": "inet6", "address": "::1", "port": 443}
    un = struct.pack("=H", socket.AF_UNIX) + b"/run/x.sock\0"
    assert decode_sockaddr(un) == {"family": "unix", "path": "/run/x.sock"}
    abstract = struct.pack("=H", socket.AF_UNIX) + b"\0name"
    assert decode_sockaddr(abstract) == {"family": "unix", "path": "@name"}


def test_filters_beyond_kernel_limits_are_refused():
    ctl = TfControl()
    with pytest.raises(FilterError, match="at most 8 pids"):
        build_filter(ctl, 0, Filters(pids=tuple(range(9))))
    with pytest.raises(FilterError, match=r"comm .*1\.\.15 printable bytes"):
        build_filter(ctl, 0, Filters(comms=("x" * 16,)))
    with pytest.raises(FilterError, match="path prefix"):
        build_filter(ctl, 0, Filters(path_prefixes=("/" * 65,)))
    build_filter(ctl, 2, Filters(pids=(1, 2), comms=("nginx",), path_prefixes=("/etc",)))
    f = ctl.filter[2]
    assert (f.npids, list(f.pids[:2]), f.ncomms, f.prefix_len) == (2, [1, 2], 1, 4)
    assert f.comms[0].value == b"nginx" and f.prefix == b"/etc"


def test_event_set_parsing():
    assert [s.name for s in parse_event_sets("file, exec,file")] == ["file", "exec"]
    with pytest.raises(UnknownEventSet, match="known: file, exec, net"):
        parse_event_sets("files")


def test_histogram_buckets():
    h = Histogram()
    for v in (5e-7, 1e-6, 3e-3, 100.0):
        h.observe(v)
    assert h.count == 4
    assert h.counts[0] == 2 and h.counts[-1] == 1


def test_time_duration_and_process_context():
    raw = expand(make_event(b"/x", Status.OK, Strategy.EXIT_RETRY))
    raw.hdr.exit_ns = 1000 + 12_345
    raw.hdr.ppid, raw.hdr.uid, raw.hdr.gid, raw.hdr.ctx_ok = 7, 1000, 100, 1
    ev, _ = decode_record(encode_record(raw), 5000)
    assert ev["duration_ns"] == 12_345 and ev["delivery_latency_ns"] == 4000
    assert (ev["ppid"], ev["uid"], ev["gid"]) == (7, 1000, 100)
    # the wall clock is the monotonic entry time moved by this host's realtime offset
    offset = time.time_ns() - time.monotonic_ns()
    assert abs(ev["time_ns"] - (1000 + offset)) < 1_000_000_000
    assert ev["args"]["flags"]["names"] == ["O_RDONLY", "O_CREAT"]
    raw.hdr.ctx_ok = 0  # not read: unknown, never uid 0 (root)
    ev, _ = decode_record(encode_record(raw), 5000)
    assert ev["uid"] is None and ev["ppid"] is None


def _records() -> list[Any]:
    """One record of each kind, with strings of different lengths."""
    from tracefleet.agent.kernel.abi import TfExecEvent, TfVfsEvent

    sc = expand(make_event(b"/etc/passwd", Status.OK, Strategy.EXIT_RETRY))
    ex = TfExecEvent()
    ex.hdr.kind, ex.hdr.syscall, ex.hdr.event_set = Kind.EXEC, Syscall.EXECVE, 1
    ex.filename.status, ex.filename.len, ex.filename.data = Status.OK, 9, b"/bin/true"
    ex.argv_status, ex.argc = Status.OK, 2
    for i, a in enumerate((b"true", b"x" * 100)):
        ex.arg_len[i] = len(a)
        ex.argv[i].value = a
    vf = TfVfsEvent()
    vf.hdr.kind, vf.hdr.syscall, vf.hdr.event_set = Kind.VFS, Syscall.VFS_RENAME, 3
    vf.path.status, vf.path.len, vf.path.data = Status.OK, 6, b"/a/old"
    vf.path2.status, vf.path2.len, vf.path2.data = Status.OK, 8, b"/a/newer"
    return [sc, ex, vf]


def test_records_are_as_long_as_their_data_and_round_trip():
    from tracefleet.agent.capture.decode import record_size

    for rec in _records():
        raw = encode_record(rec)
        assert len(raw) == record_size(rec) < ctypes.sizeof(rec) // 2
        assert bytes(expand(raw)) == bytes(rec), type(rec).__name__
    ev, _ = decode_record(encode_record(_records()[1]), 0)
    assert ev["args"]["argv"]["value"] == ["true", "x" * 100]
    ev, _ = decode_record(encode_record(_records()[2]), 0)
    assert ev["args"]["path"]["value"] == "/a/old"
    assert ev["args"]["new_path"]["value"] == "/a/newer"


def test_truncated_or_padded_records_are_refused_with_the_cause():
    from tracefleet.agent.capture.decode import RecordError

    for rec in _records():
        raw = encode_record(rec)
        for cut in range(len(raw)):  # every truncation, header included
            with pytest.raises(RecordError, match=r"truncated|shorter than the header"):
                expand(raw[:cut])
        with pytest.raises(RecordError, match="1 bytes after the last string"):
            expand(raw + b"\0")


def test_a_string_length_past_its_buffer_is_refused():
    from tracefleet.agent.capture.decode import RecordError
    from tracefleet.agent.kernel.abi import TfEvent

    raw = bytearray(make_event(b"/etc/passwd", Status.OK, Strategy.EXIT_RETRY))
    len_at = TfEvent.str.offset + 12  # str[0]'s len in its head
    struct.pack_into("=H", raw, len_at, 300)
    at = TfEvent.str.offset  # where str[0]'s head starts in the record
    want = f"string of 300 bytes at byte {at}: its buffer holds 255"
    with pytest.raises(RecordError, match=want):
        expand(bytes(raw + bytes(300)))
