"""user_events discovery, decoding and the emitter's encoding, without a kernel (no root)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tracefleet.agent import emit, userevents

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
