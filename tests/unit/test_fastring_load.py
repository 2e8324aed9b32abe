"""The compiled ring consumer's loading and layout, without root: where it cannot load, the
reason names the cause and the fix; its layout comes from abi.py and engine.py."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from tracefleet.agent.capture import fastring
from tracefleet.agent.capture.engine import LATENCY_BUCKETS_SECONDS
from tracefleet.agent.kernel.abi import Status, TfHdr


def test_missing_library_says_how_to_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(fastring.ENV, str(tmp_path / "libtfring.so"))
    lib, why = fastring._load()
    assert lib is None
    assert "not built" in why and "make native" in why, why


def test_broken_library_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "libtfring.so"
    bad.write_bytes(b"not an ELF object")
    monkeypatch.setenv(fastring.ENV, str(bad))
    lib, why = fastring._load()
    assert lib is None
    assert "does not load" in why and str(bad) in why, why


def test_disabled_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastring.ENV, "off")
    lib, why = fastring._load()
    assert lib is None and fastring.ENV in why, why


def test_layout_comes_from_abi_and_engine() -> None:
    from tracefleet.agent.capture.decode import LOST_HEADS, TF_STRH_SIZE

    p = fastring.params(LOST_HEADS)
    assert p.hdr_size == ctypes.sizeof(TfHdr)
    assert (p.off_ts, p.off_kind, p.off_syscall, p.off_set) == (
        TfHdr.ts_ns.offset, TfHdr.kind.offset, TfHdr.syscall.offset, TfHdr.event_set.offset
    )  # fmt: skip
    assert tuple(p.bounds[: p.nbounds]) == LATENCY_BUCKETS_SECONDS
    assert p.lost_status == Status.LOST
    assert p.strh_size == TF_STRH_SIZE
    for kind, (start, heads, argv) in LOST_HEADS.items():
        assert (p.lost_start[kind], p.lost_heads[kind], p.lost_argv[kind]) == (start, heads, argv)
    assert p.batch_bytes > p.reserve_bytes


def test_fold_matches_histogram_observe() -> None:
    """fold() adds C's words the way _on_record adds one record at a time."""
    import struct

    from tracefleet.agent.capture.engine import Aggregates, Histogram

    values = [0.0, 1e-6, 3e-6, 0.2, 20.0]
    h = Histogram()
    for v in values:
        h.observe(v)
    (bits,) = struct.unpack("=Q", struct.pack("=d", sum(values)))
    n = len(LATENCY_BUCKETS_SECONDS)
    words = [0, len(values), bits, 2, *h.counts, 1, 3, 99, 2]  # file: openat x3, #99 x2
    agg = Aggregates(0, 0)
    fastring.fold(agg, words, n)
    assert list(agg.sets) == ["file"]
    sa = agg.sets["file"]
    assert sa.delivered == len(values)
    assert sa.latency.counts == h.counts
    assert sa.events_by_syscall == {"openat": 3, "99": 2}


@pytest.mark.parametrize("value", ["fast", "true", "ON ", "enabled"])
def test_unknown_setting_is_an_error_at_agent_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """Not on/off/1/0/yes/no and no '/': an error naming the variable, the value and what it
    accepts, before anything loads; it meant the Python consumer silently before."""
    from tracefleet.agent import cli

    monkeypatch.setenv(fastring.ENV, value)
    assert cli.main(["probe", "-o", "json"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    for text in (fastring.ENV, repr(value), "on, 1, yes", "off, 0, no", "'/'"):
        assert text in err, (text, err)
    with pytest.raises(ValueError, match=fastring.ENV):  # engines built in-process too
        fastring.requested()


ACCEPTED = [("on", True), ("YES", True), ("1", True), ("off", False), ("No", False),
            ("0", False), ("", True), ("/opt/x/libtfring.so", True)]  # fmt: skip


@pytest.mark.parametrize(("value", "want"), ACCEPTED)
def test_accepted_settings(monkeypatch: pytest.MonkeyPatch, value: str, want: bool) -> None:
    monkeypatch.setenv(fastring.ENV, value)
    assert fastring.requested() is want
