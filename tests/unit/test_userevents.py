"""user_events discovery, decoding and the emitter's encoding, without a kernel (no root)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tracefleet.agent import emit
from tracefleet.agent.capture import userevents

# events/user_events/tf_test/format as 6.12 prints it, plus a __rel_loc and a __data_loc field
FORMAT = """name: tf_test
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:u32 count;\toffset:8;\tsize:4;\tsigned:0;
\tfield:char msg[16];\toffset:12;\tsize:16;\tsigned:1;
\tfield:s64 delta;\toffset:28;\tsize:8;\tsigned:1;
\tfield:__rel_loc char[] note;\toffset:36;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] path;\toffset:40;\tsize:4;\tsigned:1;

print fmt: "count=%u msg=%s"
"""


def test_parse_format_fields_and_kinds() -> None:
    tp_id, fields = userevents.parse_format(FORMAT)
    assert tp_id == 1234
    got = [(f.name, f.type, f.offset, f.size, f.kind) for f in fields]
    assert got == [
        ("count", "u32", 8, 4, "int"),
        ("msg", "char[16]", 12, 16, "chars"),
        ("delta", "s64", 28, 8, "int"),
        ("note", "__rel_loc char[]", 36, 4, "rel_loc"),
        ("path", "__data_loc char[]", 40, 4, "data_loc"),
    ]


def test_parse_format_unsized_char_array_takes_its_size() -> None:
    # 6.12 prints a registered char[16] as "char msg[]" with size 16
    text = "ID: 5\n\tfield:char msg[];\toffset:12;\tsize:16;\tsigned:1;\n"
    _, (f,) = userevents.parse_format(text)
    assert (f.name, f.type, f.kind) == ("msg", "char[16]", "chars")


@pytest.mark.parametrize("printed", ["1669504", "0", "16"])
def test_parse_format_array_dimension_comes_from_size(printed: str) -> None:
    # the 6.12 guest's format file once said "char msg[1669504]" for a char[16] (the kernel
    # prints a field length user_events never sets): `tracefleet-agent probe` showed it
    text = f"ID: 5\n\tfield:char msg[{printed}];\toffset:12;\tsize:16;\tsigned:1;\n"
    _, (f,) = userevents.parse_format(text)
    assert (f.name, f.type, f.kind, f.size) == ("msg", "char[16]", "chars", 16)
    text = "ID: 5\n\tfield:u32 vals[9];\toffset:12;\tsize:8;\tsigned:0;\n"
    assert userevents.parse_format(text)[1][0].type == "u32[2]"


@pytest.mark.parametrize("printed", ["", "1669504"])
def test_a_rel_loc_string_stays_a_string_whatever_length_is_printed(printed: str) -> None:
    # the kernel prints a __rel_loc array with the field length user_events leaves unset:
    # a CI run's 6.12 guest got "__rel_loc char note[<garbage>]" and the notes in hex
    text = f"ID: 5\n\tfield:__rel_loc char note[{printed}];\toffset:12;\tsize:4;\tsigned:1;\n"
    _, (f,) = userevents.parse_format(text)
    assert (f.name, f.type, f.kind) == ("note", "__rel_loc char[]", "rel_loc")
    ev = userevents.UserEvent("tf", 5, (f,))
    raw = b"\0" * 12 + struct.pack("<I", 6 << 16) + b"hello\0"
    assert userevents.decode_fields(ev, raw)["note"].value == "hello"
    assert userevents.BatchDecoder(ev).decode([raw])[0]["note"].value == "hello"


def test_parse_format_without_id_is_a_named_error() -> None:
    with pytest.raises(userevents.UserEventsError, match="no 'ID:' line"):
        userevents.parse_format("format:\n")


def test_parse_status() -> None:
    text = "tf_test # Used by perf\nidle\n\nActive: 2\nBusy: 1\n"
    assert userevents.parse_status(text) == {"tf_test": ("perf",), "idle": ()}


def _record(fixed: bytes, tail: bytes = b"") -> bytes:
    return struct.pack("<HBBi", 7, 0, 0, 4242) + fixed + tail


def test_decode_every_kind() -> None:
    _, fields = userevents.parse_format(FORMAT)
    ev = userevents.UserEvent("tf_test", 1234, fields)
    note, path = b"hello\0", b"/etc/x\0"
    # note's data right after the fixed part (offset 44): relative to its field end (40)
    rel = len(note) << 16 | (44 - 40)
    data = len(path) << 16 | (44 + len(note))  # data_loc: from the record start
    fixed = struct.pack("<I16sqII", 7, b"msg-7", -5, rel, data)
    args = userevents.decode_fields(ev, _record(fixed, note + path))
    assert {k: (a.value, a.status) for k, a in args.items()} == {
        "count": (7, "ok"),
        "msg": ("msg-7", "ok"),
        "delta": (-5, "ok"),
        "note": ("hello", "ok"),
        "path": ("/etc/x", "ok"),
    }


def test_decode_hostile_lengths_are_truncated_not_errors() -> None:
    _, fields = userevents.parse_format(FORMAT)
    ev = userevents.UserEvent("tf_test", 1234, fields)
    rel = 0xFFFF << 16 | 0  # claims 64 KiB past the record
    fixed = struct.pack("<I16sqII", 1, b"x" * 16, 0, rel, 0xFFFF0000 | 0xFFFF)
    args = userevents.decode_fields(ev, _record(fixed))
    assert args["note"].status == "truncated" and args["note"].value is None
    assert args["path"].status == "truncated"
    assert args["msg"].value == "x" * 16  # no NUL: the whole array, no overread
    short = userevents.decode_fields(ev, _record(struct.pack("<I", 3)))
    assert short["count"].value == 3
    assert short["msg"].status == "truncated" and short["path"].status == "truncated"


def test_emitter_encoding_decodes_back() -> None:
    fields = "u32 count; char[16] msg; s64 delta; __rel_loc char[] note"
    ue = emit.UserEvent("tf_py", fields, data_file=Path("/nonexistent/user_events_data"))
    payload = b"".join(ue.encode(9, "a-very-long-message-cut", -3, "tail text"))
    fmt = FORMAT.split("\tfield:__data_loc")[0] + "\n"
    tp_id, parsed = userevents.parse_format(fmt)
    decoded = userevents.decode_fields(userevents.UserEvent("tf_py", tp_id, parsed),
                                       _record(payload))  # fmt: skip
    assert {k: a.value for k, a in decoded.items()} == {
        "count": 9, "msg": "a-very-long-mes", "delta": -3, "note": "tail text",
    }  # fmt: skip


def test_emitter_is_a_noop_with_a_reason_without_user_events(tmp_path: Path) -> None:
    ue = emit.UserEvent("tf_py", "u32 n", data_file=tmp_path / "user_events_data")
    assert not ue.registered and not ue.enabled
    assert "no user_events" in ue.reason and "CONFIG_USER_EVENTS" in ue.reason
    assert ue.emit(1) is False and ue.write(1) is False
    ue.close()


def test_emitter_refuses_unknown_field_types() -> None:
    with pytest.raises(ValueError, match="not supported here"):
        emit.UserEvent("x", "float f", data_file=Path("/nonexistent"))


def test_find_event_names_the_cause(tmp_path: Path) -> None:
    with pytest.raises(userevents.UserEventsError, match="not valid"):
        userevents.find_event("../../etc", tmp_path)
    (tmp_path / "events").mkdir()
    with pytest.raises(userevents.UserEventsError, match="CONFIG_USER_EVENTS"):
        userevents.find_event("tf_test", tmp_path)
    (tmp_path / "user_events_data").write_text("")
    (tmp_path / "user_events_status").write_text("\nActive: 0\nBusy: 0\n")
    with pytest.raises(userevents.UserEventsError, match=r"no such user_event.*start the producer"):
        userevents.find_event("tf_test", tmp_path)
    d = tmp_path / "events" / "user_events" / "tf_test"
    d.mkdir(parents=True)
    (d / "format").write_text(FORMAT)
    assert userevents.find_event("tf_test", tmp_path).id == 1234


def test_batch_decoder_matches_decode_fields_on_every_case() -> None:
    """BatchDecoder (one struct call per record) gives decode_fields' results, record for
    record: whole, hostile loc words, cut short, and a format a struct cannot express."""
    _, fields = userevents.parse_format(FORMAT)
    ev = userevents.UserEvent("tf_test", 1234, fields)
    note, path = b"hello\0", b"/etc/x\0"
    rel = len(note) << 16 | (44 - 40)
    data = len(path) << 16 | (44 + len(note))
    raws = [
        _record(struct.pack("<I16sqII", 7, b"msg-7", -5, rel, data), note + path),
        _record(struct.pack("<I16sqII", 2**32 - 1, b"x" * 16, -(2**63), 0xFFFF << 16, 0xFFFFFFFF)),
        _record(struct.pack("<I", 3)),
        _record(b""),
    ]
    dec = userevents.BatchDecoder(ev)
    assert dec.decode(raws) == [userevents.decode_fields(ev, r) for r in raws]
    assert dec.decode(raws)[0]["note"].value == "hello"
    overlap = userevents.UserEvent("o", 1, (
        userevents.Field("a", "u32", 8, 4, False), userevents.Field("b", "u16", 10, 2, False),
    ))  # fmt: skip
    assert userevents.BatchDecoder(overlap).decode(raws) == [
        userevents.decode_fields(overlap, r) for r in raws
    ]


# --- the perf-ring readers on a synthetic ring (no kernel): the compiled one (tf_perf_drain)
# and the Python walker must give the same samples, counts and tail on the same bytes


class _FakeRing:
    """An anonymous mapping laid out like a perf mmap (control page, then a small data area
    so records wrap its end), written by hand as the kernel would."""

    PAGE, SIZE = 4096, 1024

    def __init__(self, start: int) -> None:
        import mmap

        self.mm = mmap.mmap(-1, self.PAGE + self.SIZE)
        struct.pack_into("<QQ", self.mm, 1040, self.PAGE, self.SIZE)  # data_offset, data_size
        self.head = start
        struct.pack_into("<Q", self.mm, 1032, start)  # data_tail
        self.publish()

    def publish(self) -> None:
        struct.pack_into("<Q", self.mm, 1024, self.head)

    def put(self, rec: bytes) -> None:
        for i, b in enumerate(rec):
            self.mm[self.PAGE + (self.head + i) % self.SIZE] = b
        self.head += len(rec)

    def sample(self, pid: int, ts: int, raw: bytes, rawlen: int | None = None) -> None:
        body = struct.pack("<IIQII", pid, pid + 1, ts, pid % 4, 0)
        body += struct.pack("<I", len(raw) if rawlen is None else rawlen) + raw
        body += b"\0" * (-(8 + len(body)) % 8)
        self.put(struct.pack("<IHH", 9, 0, 8 + len(body)) + body)

    def lost(self, n: int) -> None:
        self.put(struct.pack("<IHHQQ", 2, 0, 24, 7, n))

    @property
    def tail(self) -> int:
        return int(struct.unpack_from("<Q", self.mm, 1032)[0])


def _reader(reader: str, fake: _FakeRing, cap: int = 0) -> userevents.PerfTracepoint:
    if reader == "compiled":
        ok, why = userevents.compiled_reader_status()
        assert ok, f"{why}: the compiled reader is built by `make native` (make workloads)"
    pt = userevents.PerfTracepoint(0, reader=reader)
    pt._choose_reader()
    pt.rings.append(userevents._Ring(-1, fake.mm, fake.PAGE, fake.SIZE))  # fd -1: no lost count
    pt._attach_reader()
    if cap:
        pt._cap = cap
    return pt


def _done(pt: userevents.PerfTracepoint) -> None:
    for r in pt.rings:
        r.pin = None  # the ctypes view exports the mapping
        r.mm.close()
    pt.rings.clear()


def _fill(fake: _FakeRing) -> list[tuple[int, int, int, int, bytes]]:
    want = []
    for i in range(9):  # 40-56 bytes each from 1000: the first wraps the area's end
        raw = bytes([i]) * (4 + 8 * (i % 3))
        fake.sample(100 + i, 1000 + i, raw)
        want.append((100 + i, 101 + i, 1000 + i, (100 + i) % 4, raw))
    fake.lost(5)
    fake.sample(7, 7, b"\1" * 12, rawlen=200)  # raw size past its record: malformed, skipped
    fake.sample(200, 2000, b"x" * 20)
    want.append((200, 201, 2000, 0, b"x" * 20))
    fake.publish()
    return want


# cap 2: the compiled reader's index fills, and it is called again until the ring is empty
@pytest.mark.parametrize(("reader", "cap"), [("python", 0), ("compiled", 0), ("compiled", 2)])
def test_perf_readers_agree_on_wrapped_lost_and_malformed_records(reader: str, cap: int) -> None:
    fake = _FakeRing(1000)
    want = _fill(fake)
    pt = _reader(reader, fake, cap)
    assert list(pt.read()) == want
    assert (pt.counters.events, pt.counters.malformed, pt.counters.dropped) == (10, 1, 5)
    assert fake.tail == fake.head  # everything consumed, published for the kernel
    if reader == "compiled":
        assert pt.drain_calls == (1 if not cap else 5)
    assert list(pt.read()) == [] and pt.counters.events == 10  # nothing twice
    fake.sample(300, 3000, b"y" * 4)  # and a later record after the wraps
    fake.publish()
    assert list(pt.read()) == [(300, 301, 3000, 0, b"y" * 4)]
    _done(pt)


@pytest.mark.parametrize("reader", ["python", "compiled"])
def test_perf_readers_stop_at_a_corrupt_header(reader: str) -> None:
    fake = _FakeRing(0)
    fake.sample(1, 1, b"a" * 4)
    fake.put(struct.pack("<IHH", 9, 0, 4))  # size 4: below a header
    fake.sample(2, 2, b"b" * 4)
    fake.publish()
    pt = _reader(reader, fake)
    assert [r[0] for r in pt.read()] == [1]  # the rest is skipped, never spun on
    assert pt.counters.malformed == 1 and fake.tail == fake.head
    _done(pt)


@pytest.mark.parametrize("reader", ["python", "compiled"])
def test_perf_batch_without_payloads_keeps_every_stamp(reader: str) -> None:
    """What the engine reads when nobody decodes events (count and latency only)."""
    fake = _FakeRing(1000)
    want = _fill(fake)
    pt = _reader(reader, fake)
    b = pt.read_batch(payloads=False)
    assert (b.pids, b.tids, b.times, b.cpus, b.raws) == (
        [w[0] for w in want], [w[1] for w in want], [w[2] for w in want],
        [w[3] for w in want], [],
    )  # fmt: skip
    assert (pt.counters.events, pt.counters.malformed, fake.tail) == (10, 1, fake.head)
    _done(pt)


def test_latency_histogram_in_bulk_matches_observe() -> None:
    """The engine's count-only path builds the batch's latency histogram in bulk; it must
    count exactly as one observe() per record, on the bounds and for stamps after now."""
    import random

    from tracefleet.agent.capture.engine import Histogram

    now = 10**12
    rng = random.Random(18)
    lat_ns = [int(b * 1e9) for b in Histogram().bounds]  # exactly on each bound
    lat_ns += [x + d for x in lat_ns for d in (-1, 1)]
    lat_ns += [rng.randrange(0, 20 * 10**9) for _ in range(500)] + [-5, -1, 0, 30 * 10**9]
    stamps = [now - x for x in lat_ns]
    want = Histogram()
    for ts in stamps:
        want.observe(max(0, now - ts) / 1e9)
    got = userevents.latency_histogram(now, stamps)
    assert got.counts == want.counts and got.count == len(stamps)
    assert got.sum == pytest.approx(want.sum, rel=1e-12)
    assert userevents.latency_histogram(now, []).count == 0
