"""Contained per-record failures (agent capture/contain.py): counts per (set, cause), one
log line per distinct cause, escaped text. No root."""

from __future__ import annotations

import logging

from tracefleet.agent.capture.contain import CAUSES, ErrorCounter


def test_counts_every_failure_and_logs_each_cause_once(caplog):
    caplog.set_level(logging.DEBUG, logger="tracefleet.agent")
    errors = ErrorCounter(interval=3600)
    for _ in range(5):
        errors.count("exec", "fallback", ValueError("short read"))
    errors.count("file", "sink", BrokenPipeError("gone"))
    errors.count("file", "fallback", ValueError("short read"))
    assert errors.snapshot() == {("exec", "fallback"): 5, ("file", "sink"): 1,
                                 ("file", "fallback"): 1}  # fmt: skip
    assert errors.total() == 7 and errors.total("file") == 2
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # one per distinct (cause, exception type), no traceback at error level
    assert len(lines) == 2, [r.getMessage() for r in lines]
    assert not any(r.exc_info for r in lines)


def test_running_count_once_the_interval_has_passed(caplog):
    errors = ErrorCounter(interval=0)  # every call is past the interval
    for _ in range(3):
        errors.count("net", "decode", ValueError("unknown record kind 9"))
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(msgs) == 3
    assert "3 so far" in msgs[-1]


def test_text_from_a_record_is_escaped_and_the_cause_label_bounded(caplog):
    errors = ErrorCounter()
    errors.count("file", "not-a-cause", KeyError("\x1b[31mred\x07" + "x" * 1000))
    assert set(c for _, c in errors.snapshot()) <= set(CAUSES)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "\x1b" not in msg and "\x07" not in msg and "\\x1b" in msg
    assert len(msg) < 600
