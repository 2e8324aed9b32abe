"""Redaction is contained per argument and fails closed: an argument whose redaction raises
is sent as *** (counted under cause=redact), the other arguments are redacted as usual."""

from __future__ import annotations

from tracefleet.agent.control import redact
from tracefleet.agent.control.redact import MASK, Redactor


class _Poisoned(str):
    """A value whose comparison raises, standing for any failure inside redaction."""

    def __ne__(self, other: object) -> bool:
        raise RuntimeError("injected redaction failure")


def test_a_failing_argument_is_masked_and_counted_the_rest_redacted():
    before = redact.ERRORS.snapshot().get(("exec", "redact"), 0)
    r = Redactor([r"--password=(\S+)"])
    ev = {
        "event_set": "exec",
        "args": {
            "filename": {"value": _Poisoned("/bin/secret-tool"), "status": "ok"},
            "argv": {"value": ["tool", "--password=hunter2"], "status": "ok"},
        },
    }
    out = r.event(ev)
    assert out["args"]["filename"] == {"value": MASK, "status": "ok", "redacted": True}
    assert out["args"]["argv"]["value"] == ["tool", "--password=***"]
    assert redact.ERRORS.snapshot().get(("exec", "redact"), 0) - before == 1
