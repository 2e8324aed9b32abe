"""The compiled decode (agent/native/pydecode.c over libtfring's record walker, cdecode.py)
against decode.py's decode_record, record by record: the dicts must be equal (same keys in
the same order, same values, same types, recursively) for every record the compiled decode
accepts, and every record it declines must be one Python reports as malformed (RecordError)
or one that needs what only Python has (the mount table), with that reason.

No root: synthetic records made with decode.py's encoder, of every set (file, net, exec,
vfs) and every syscall of each, with random and hostile contents: invalid UTF-8 and NULs in
paths, comm and argv, every status and strategy code (unknown ones too), known, unknown and
positive errors, lost and truncated arguments, unknown set and syscall ids, socket addresses
of every family and length, short open_how, and records truncated, with wrong lengths,
trailing bytes, an unknown kind, too many argv entries. Then whole batches in the compiled
consumer's layout: order, the records left to Python (REC_RAW, REC_FALLBACK, declined) and
the samples. The extension and library are built by `make native`: missing, this fails."""

from __future__ import annotations

import ctypes
import random
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from tracefleet.agent.capture import cdecode, decode, fastring
from tracefleet.agent.capture.decode import RecordError, decode_record, encode_record
from tracefleet.agent.capture.eventsets import BY_ID
from tracefleet.agent.kernel.abi import (
    TF_ARG_MAX,
    TF_ARGV_COUNT,
    EventSetId,
    Kind,
    PathKind,
    Syscall,
    TfEvent,
    TfExecEvent,
    TfStr,
    TfVfsEvent,
)

OFFSET = 1_764_000_000_123_456_789
NOW = 9_000_000_000
SC_IDS = {s.name.lower(): int(s) for s in Syscall}
# statuses and strategies: every known code, and unknown ones
STATUSES = [*range(10), 31, 200]
STRATEGIES = [*range(9), 17, 255]
ERRS = [0, 0, 0, -14, -2, -4000, 5, -(2**31)]


@pytest.fixture(scope="module")
def dec() -> Iterator[cdecode.BatchDecoder]:
    lib = fastring.library()
    assert lib is not None, f"libtfring.so does not load: {fastring.consumer_status()[1]}"
    ok, why = cdecode.status()
    assert ok, why
    # no self-check here: these tests are the comparison (test_self_check runs it)
    d = cdecode.BatchDecoder(lib, None, self_check=False)
    yield d
    d.close()


def test_self_check() -> None:
    """The start-up comparison (a record of each kind) passes: the decoder is used."""
    lib = fastring.library()
    assert lib is not None
    cdecode.BatchDecoder(lib, None).close()


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode.WALL_CLOCK, "offset_at", lambda now: OFFSET)


def same(a: Any, b: Any, where: str = "ev") -> None:
    """Equal, of the same types, dict keys in the same order, recursively."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__} ({a!r}, {b!r})"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def python(raw: bytes) -> dict[str, Any] | None:
    """decode.py's dict (exe as ExeResolver(-1) leaves it: None), or None: RecordError."""
    try:
        ev, _ = decode_record(raw, NOW)
    except RecordError:
        return None
    return ev


def needs_mounts(raw: bytes) -> bool:
    """A vfs record whose path Python completes from the mount table."""
    rec = decode.expand(raw)
    if not isinstance(rec, TfVfsEvent):
        return False
    shown = rec.path.status in decode._SHOWN
    path = bytes(rec.path.data)[: rec.path.len]
    p2_shown = rec.path2.status in decode._SHOWN
    op = decode.SYSCALL_NAMES.get(rec.hdr.syscall, "")
    return ((rec.path_kind == PathKind.MOUNT_REL and shown)
            or (op in decode._VFS_PATH2 and rec.path2_kind == PathKind.MOUNT_REL and p2_shown)
            or (not rec.dev and shown and bool(path)))  # fmt: skip


def check(dec: cdecode.BatchDecoder, raw: bytes, stats: dict[str, int]) -> None:
    got = dec.decode(raw, NOW, OFFSET)
    want = python(raw)
    if want is None:
        assert got == "malformed", (raw, got)
        stats["malformed"] = stats.get("malformed", 0) + 1
        return
    if isinstance(got, str):
        rec = decode.expand(raw)
        if got == "mounts":
            assert needs_mounts(raw), (got, want)
        elif got == "name":  # a vfs path kind past the handed-over table
            assert isinstance(rec, TfVfsEvent) and max(rec.path_kind, rec.path2_kind) >= 32
        else:
            raise AssertionError(f"declined ({got}): {want!r}")
        stats[got] = stats.get(got, 0) + 1
        return
    same(got, want)
    stats["equal"] = stats.get("equal", 0) + 1


# ---- record makers ----------------------------------------------------------------------


def rbytes(rng: random.Random, n: int) -> bytes:
    pieces = [b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80", b"\xc0\xaf",
              b"\xf4\x90\x80\x80", b"\xf0\x90", b"\x80", b"\xff", b'"', b"\\", b"\n", b"\x00",
              b"\x7f", b"a", b"/"]  # fmt: skip
    if rng.random() < 0.4:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, n + 1)))
    return b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, n // 3 + 1)))[:n]


def put(s: Any, data: bytes, rng: random.Random) -> None:
    s.uptr = rng.choice([0, 0x7FFC0000, rng.getrandbits(64)])
    s.len, s.status, s.strategy = len(data), rng.choice(STATUSES), rng.choice(STRATEGIES)
    s.err = rng.choice(ERRS)
    ctypes.memmove(ctypes.addressof(s) + TfStr.data.offset, data, len(data))


def header(h: Any, rng: random.Random, kind: int, sc: int, set_id: int) -> None:
    h.ts_ns = rng.choice([5_000_000_000, rng.getrandbits(63), 0, NOW + 5])
    h.exit_ns = rng.choice([0, h.ts_ns + rng.getrandbits(20), max(0, h.ts_ns - 5)])
    h.cgroup_id, h.ret = rng.getrandbits(64), rng.getrandbits(64) - (1 << 63)
    h.pid, h.tid = rng.getrandbits(32), rng.getrandbits(32)
    h.kind, h.syscall, h.event_set = kind, sc, set_id
    h.strategy = rng.choice(STRATEGIES)
    h.comm = rbytes(rng, 16)
    h.ctx_ok = rng.choice([0, 1, 1, 7])
    h.ppid, h.uid, h.gid = rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32)
    h.exe_ino, h.exe_dev, h.exe_gen = rng.choice([(0, 0, 0), (rng.getrandbits(64), 5, 1)])


def iargs(rec: Any, rng: random.Random) -> None:
    for i in range(6):
        rec.iargs[i] = rng.choice([rng.getrandbits(64) - (1 << 63), rng.getrandbits(32),
                                   rng.getrandbits(12), -100, 0, 0o2101101])  # fmt: skip


def sockaddr(rng: random.Random) -> bytes:
    fam = rng.choice([socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, 0, 16, 0xFFFF])
    head = struct.pack("=H", fam) + rng.getrandbits(16).to_bytes(2, "big")
    body = {
        socket.AF_INET: lambda: bytes(rng.getrandbits(8) for _ in range(4)) + bytes(8),
        socket.AF_INET6: lambda: bytes(4) + bytes(
            rng.choice([0, 0, rng.getrandbits(8)]) for _ in range(16)) + bytes(4),
    }.get(fam, lambda: rbytes(rng, 100))()  # fmt: skip
    if fam == socket.AF_UNIX:
        body = rng.choice([b"", b"\0", b"\0abstract\0\0", b"/run/x.sock\0junk", rbytes(rng, 60),
                           b"\0" + rbytes(rng, 30) + b"\0" * rng.randrange(3)])  # fmt: skip
        return struct.pack("=H", fam) + body
    raw = head + body
    return raw[: rng.choice([len(raw), len(raw), 1, 2, 7, 8, 23, 24, rng.randrange(len(raw) + 1)])]


def syscall_record(rng: random.Random, set_id: int, sc: int) -> bytes:
    rec = TfEvent()
    header(rec.hdr, rng, Kind.SYSCALL, sc, set_id)
    iargs(rec, rng)
    put(rec.str[0], rbytes(rng, 255), rng)
    if rng.random() < 0.5:
        put(rec.str[1], rbytes(rng, 255), rng)  # renames' newname, the open family's kernel path
    blob = sockaddr(rng) if set_id == EventSetId.NET else bytes(
        rng.getrandbits(8) for _ in range(rng.choice([24, 24, 0, 8, 23, 32, 128])))  # fmt: skip
    put(rec.blob, blob[:128], rng)
    return encode_record(rec)


def exec_record(rng: random.Random, set_id: int, sc: int) -> bytes:
    rec = TfExecEvent()
    header(rec.hdr, rng, Kind.EXEC, sc, set_id)
    iargs(rec, rng)
    put(rec.filename, rbytes(rng, 255), rng)
    rec.argv_uptr, rec.argv_err = rng.getrandbits(64), rng.choice(ERRS)
    rec.argv_status, rec.argv_strategy = rng.choice(STATUSES), rng.choice(STRATEGIES)
    rec.argc = rng.randrange(TF_ARGV_COUNT + 1)
    for i in range(rec.argc):
        a = rbytes(rng, TF_ARG_MAX - 1)
        rec.arg_len[i] = len(a)
        ctypes.memmove(ctypes.addressof(rec) + TfExecEvent.argv.offset + i * TF_ARG_MAX, a, len(a))
    return encode_record(rec)


def vfs_record(rng: random.Random, set_id: int, sc: int) -> bytes:
    rec = TfVfsEvent()
    header(rec.hdr, rng, Kind.VFS, sc, set_id)
    rec.ino = rng.choice([0, rng.getrandbits(64)])
    rec.bytes_read, rec.bytes_written, rec.pos = (rng.getrandbits(64) for _ in range(3))
    rec.arg = rng.choice([rng.getrandbits(64), 0o100101, 0])
    rec.dev = rng.choice([0, 0x800001, rng.getrandbits(32)])
    rec.reads, rec.writes = rng.getrandbits(32), rng.getrandbits(32)
    rec.path_kind = rng.choice([*range(6), 6, 31, 40, 255])
    rec.path2_kind = rng.choice([*range(6), 40])
    rec.fstype = rbytes(rng, 16)
    put(rec.path, rng.choice([b"", b"/", b"/srv/x", rbytes(rng, 255)]), rng)
    put(rec.path2, rbytes(rng, 255), rng)
    return encode_record(rec)


def every_set_and_syscall() -> Iterator[tuple[int, int, Any]]:
    """(set, syscall, maker): each syscall of each set, and ids no table names."""
    for set_id, spec in BY_ID.items():
        maker = {EventSetId.EXEC: exec_record, EventSetId.VFS: vfs_record}.get(
            EventSetId(set_id), syscall_record)  # fmt: skip
        for name in spec.syscalls:
            if name in SC_IDS:
                yield set_id, SC_IDS[name], maker
        yield set_id, 99, maker  # no name: str(99), no spec
        yield set_id, SC_IDS["openat"] if set_id != 0 else SC_IDS["connect"], maker
    for set_id in (5, 7):  # no such set
        for maker in (syscall_record, exec_record, vfs_record):
            yield set_id, SC_IDS["openat"], maker


# ---- tests ------------------------------------------------------------------------------


def test_every_set_and_syscall_random(dec: cdecode.BatchDecoder) -> None:
    rng = random.Random(14)
    stats: dict[str, int] = {}
    for set_id, sc, maker in every_set_and_syscall():
        for _ in range(60):
            check(dec, maker(rng, set_id, sc), stats)
    # most records are decoded in C; the declines are the vfs paths needing the mounts
    assert stats["equal"] > 2500, stats
    assert set(stats) <= {"equal", "mounts", "name"}, stats


def test_hostile_lengths(dec: cdecode.BatchDecoder) -> None:
    """Truncated records, lengths that do not add up, trailing bytes, an unknown kind, too
    many argv entries, strings longer than their buffer: Python raises RecordError, the
    compiled decode declines as malformed; cuts that still parse are compared."""
    rng = random.Random(15)
    stats: dict[str, int] = {}
    makers = [
        (0, SC_IDS["openat"], syscall_record),
        (2, SC_IDS["connect"], syscall_record),
        (1, SC_IDS["execve"], exec_record),
        (3, SC_IDS["vfs_rename"], vfs_record),
    ]
    for _ in range(400):
        set_id, sc, maker = rng.choice(makers)
        raw = bytearray(maker(rng, set_id, sc))
        how = rng.randrange(6)
        if how == 0:
            raw = raw[: rng.randrange(len(raw))]
        elif how == 1:
            raw += bytes(rng.randrange(1, 9))
        elif how == 2:  # a string head's len, or an argv length, set at random
            at = rng.randrange(96, len(raw) - 1)
            raw[at : at + 2] = rng.getrandbits(16).to_bytes(2, "little")
        elif how == 3:
            raw[40:42] = rng.choice([0, 4, 9, 0xFFFF]).to_bytes(2, "little")  # kind
        elif how == 4 and maker is exec_record:  # argc past the entries kept
            at = TfExecEvent.filename.offset + decode.TF_STRH_SIZE
            at += int.from_bytes(raw[at - 4 : at - 2], "little") + 12
            raw[at : at + 2] = rng.choice([17, 0xFFFF]).to_bytes(2, "little")
        else:  # a string of 256+ bytes claimed
            at = 144 + 12 if maker is syscall_record else len(raw) - 4
            raw[at : at + 2] = (256 + rng.randrange(100)).to_bytes(2, "little")
        check(dec, bytes(raw), stats)
    assert stats.get("malformed", 0) > 200, stats
    assert stats.get("short", 0) == 0


def test_short_records(dec: cdecode.BatchDecoder) -> None:
    for n in (0, 1, 40, 95):
        assert dec.decode(b"\x01" * n, NOW, OFFSET) == "malformed"


def test_vfs_needing_mounts_declined(dec: cdecode.BatchDecoder) -> None:
    rng = random.Random(3)
    rec = TfVfsEvent()
    header(rec.hdr, rng, Kind.VFS, SC_IDS["vfs_unlink"], EventSetId.VFS)
    rec.path_kind, rec.dev = PathKind.MOUNT_REL, 0x800001
    put(rec.path, b"/rel/x", rng)
    rec.path.status = 1
    assert dec.decode(encode_record(rec), NOW, OFFSET) == "mounts"
    rec.path_kind, rec.dev = PathKind.USER, 0
    assert dec.decode(encode_record(rec), NOW, OFFSET) == "mounts"


def test_exe_resolved_as_exe_py(dec: cdecode.BatchDecoder) -> None:
    """A cached executable of every byte value: the path ExeResolver would give (its bytes
    decoded with backslashreplace); a kernel thread and an uncached one: None."""
    rng = random.Random(5)
    path = bytes(range(1, 256))
    dec.tables.seed_exe((77, 8, 9), path)
    rec = TfEvent()
    header(rec.hdr, rng, Kind.SYSCALL, SC_IDS["unlink"], EventSetId.FILE)
    put(rec.str[0], b"/x", rng)
    for ident, want in (((77, 8, 9), path.decode("utf-8", "backslashreplace")),
                        ((0, 0, 0), None), ((78, 8, 9), None)):  # fmt: skip
        rec.hdr.exe_ino, rec.hdr.exe_dev, rec.hdr.exe_gen = ident
        got = dec.decode(encode_record(rec), NOW, OFFSET)
        assert isinstance(got, dict)
        assert got["exe"] == want
        got["exe"] = None
        same(got, python(encode_record(rec)))


def _batch(entries: list[tuple[bytes, int, int]]) -> ctypes.Array[ctypes.c_char]:
    out = b""
    for raw, flags, now in entries:
        out += struct.pack("=IIQ", len(raw), flags, now) + raw + bytes(-len(raw) % 8)
    return ctypes.create_string_buffer(out, len(out))


def test_batch_order_declines_and_samples(dec: cdecode.BatchDecoder) -> None:
    rng = random.Random(9)
    entries = []
    for i in range(300):
        set_id, sc, maker = rng.choice(list(every_set_and_syscall()))
        raw = maker(rng, set_id, sc)
        if rng.random() < 0.1:
            raw = raw[: rng.randrange(len(raw))]
        flags = rng.choice([0, 0, 0, fastring.REC_SAMPLE, fastring.REC_FALLBACK, fastring.REC_RAW])
        entries.append((raw, flags, NOW + i))
    buf = _batch(entries)
    before = dec.counters()
    items, sampled, nxt = dec.decode_batch(ctypes.addressof(buf), len(buf), True, 0, 1000)
    assert nxt == len(buf)
    assert len(items) == len(entries)
    sampled_ids = {id(e) for e in sampled}
    for (raw, flags, now), item in zip(entries, items, strict=True):
        if isinstance(item, tuple):  # left to Python: on_record's arguments
            assert item == (raw, now, -1 if flags & fastring.REC_RAW else flags)
            if not flags & (fastring.REC_RAW | fastring.REC_FALLBACK):
                assert python(raw) is None or needs_mounts(raw) or isinstance(
                    decode.expand(raw), TfVfsEvent)  # fmt: skip
            continue
        assert not flags & (fastring.REC_RAW | fastring.REC_FALLBACK)
        assert (id(item) in sampled_ids) == bool(flags & fastring.REC_SAMPLE)
        ev, _ = decode_record(raw, now)
        same(item, ev)
    after = dec.counters()
    assert after["decoded"] - before["decoded"] == sum(not isinstance(i, tuple) for i in items)
    # not delivered: only the sampled ones become dicts, the rest are counted only
    whole = items
    items, sampled, _ = dec.decode_batch(ctypes.addressof(buf), len(buf), False, 0, 1000)
    assert all(isinstance(i, tuple) or id(i) in {id(s) for s in sampled} for i in items)
    # in slices: the same items, in the same order
    start, sliced = 0, []
    while start < len(buf):
        part, _, start = dec.decode_batch(ctypes.addressof(buf), len(buf), True, start, 7)
        assert len(part) <= 7
        sliced += part
    assert len(sliced) == len(whole)
    for a, b in zip(sliced, whole, strict=True):
        same(a, b)


def test_batch_past_its_end_raises(dec: cdecode.BatchDecoder) -> None:
    buf = ctypes.create_string_buffer(struct.pack("=IIQ", 4096, 0, 1) + bytes(64))
    with pytest.raises(ValueError):
        dec.decode_batch(ctypes.addressof(buf), len(buf) - 1, True, 0, 100)


def test_closed_decoder_raises() -> None:
    lib = fastring.library()
    assert lib is not None
    d = cdecode.BatchDecoder(lib, None, self_check=False)
    raw = cdecode.sample_records()[0]
    assert isinstance(d.decode(raw, NOW, OFFSET), dict)
    d.close()
    with pytest.raises(cdecode.DecodeError):
        d.decode(raw, NOW, OFFSET)


def test_missing_or_off_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extension, or with TRACEFLEET_DECODE=off, Python decodes and status() says
    why; a value that is neither on nor off is named."""
    import sys

    from tracefleet.agent import capture

    monkeypatch.setitem(sys.modules, "tracefleet.agent.capture._tfdecode", None)
    monkeypatch.delattr(capture, "_tfdecode", raising=False)  # as if never imported
    ok, why = cdecode._load()
    assert not ok and "_tfdecode" in why and "make native" in why, why
    monkeypatch.setattr(cdecode, "_status", None)
    lib = fastring.library()
    assert lib is not None
    with pytest.raises(cdecode.DecodeError, match="does not load"):
        cdecode.BatchDecoder(lib, None)
    monkeypatch.setenv(cdecode.ENV, "off")
    assert cdecode._load() == (False, f"disabled by {cdecode.ENV}=off")
    monkeypatch.setenv(cdecode.ENV, "maybe")
    with pytest.raises(cdecode.SettingError):
        cdecode.requested()
