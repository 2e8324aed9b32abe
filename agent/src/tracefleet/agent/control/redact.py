"""Redaction of sampled events before they leave the node (pure, no I/O).

The controller distributes regular expressions in ``DesiredState.redact_patterns``. Each is
applied to every string value of an event's args: plain string args, every entry of a list
value (``args.argv.value``) and every value of a mapping value. A pattern without groups
replaces the whole match with ``***``; a pattern with groups replaces each matched group only
(``--password=(\\S+)`` turns ``--password=hunter2`` into ``--password=***``). A list value
(argv) is also matched as one command line (its elements joined by spaces), so a rule for
``--password VALUE`` masks the element after ``--password``. A changed argument gets
``"redacted": True``. The controller sends its default rules for common secret shapes
(``redaction.DEFAULT_RULES`` there) unless its policy file relaxes them.

Fail closed: if a pattern does not compile, every string value is replaced by ``***``; if
redacting one argument fails, that argument's value is replaced by ``***`` (counted in
``ERRORS`` under cause=redact, which the agent's metrics include) and the rest goes on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from tracefleet.agent.capture.contain import UNKNOWN_SET, ErrorCounter
from tracefleet.agent.capture.eventsets import EVENT_SETS
from tracefleet.model.redaction import MASK, Patterns

# redaction failures of this process (Redactors are replaced when the patterns change)
ERRORS = ErrorCounter()


class Redactor:
    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        self.errors: list[str] = []
        for p in self.patterns:
            try:
                re.compile(p)
            except re.error as e:
                self.errors.append(f"{p!r}: {e}")
        self.fail_closed = bool(self.errors)
        self._rx = Patterns(() if self.fail_closed else self.patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def text(self, value: str) -> str:
        if self.fail_closed:
            return MASK
        return self._rx.text(value)

    def _list(self, value: list[Any] | tuple[Any, ...]) -> tuple[list[Any], bool]:
        """Each string element alone, and all of them as one space-joined command line."""
        if self.fail_closed:
            return [MASK if isinstance(v, str) else v for v in value], any(
                isinstance(v, str) for v in value
            )
        return self._rx.strings(value)

    def _value(self, value: Any) -> tuple[Any, bool]:
        if isinstance(value, str):
            new = self.text(value)
            return new, new != value
        if isinstance(value, list | tuple):
            return self._list(value)
        if isinstance(value, Mapping):
            outm, changed = {}, False
            for k, v in value.items():
                nv, c = self._value(v) if isinstance(v, str) else (v, False)
                outm[k] = nv
                changed |= c
            return outm, changed
        return value, False

    def event(self, event: Mapping[str, Any]) -> Mapping[str, Any]:
        """The event with redacted args (a copy if anything changed; the input is kept)."""
        args = event.get("args")
        if not self or not isinstance(args, Mapping):
            return event
        new_args: dict[str, Any] = {}
        changed_any = False
        for name, arg in args.items():
            try:
                if isinstance(arg, Mapping):
                    value, changed = self._value(arg.get("value"))
                    if changed:
                        arg = {**arg, "value": value, "redacted": True}
                else:
                    value, changed = self._value(arg)
                    if changed:
                        arg = {"value": value, "status": "ok", "redacted": True}
            except Exception as e:  # fail closed for this argument only
                es = event.get("event_set")
                ERRORS.count(es if es in EVENT_SETS else UNKNOWN_SET, "redact", e)
                base = dict(arg) if isinstance(arg, Mapping) else {"status": "ok"}
                arg, changed = {**base, "value": MASK, "redacted": True}, True
            changed_any |= changed
            new_args[name] = arg
        if not changed_any:
            return event
        return {**event, "args": new_args}


def redact_events(
    redactor: Redactor, events: Iterable[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    return [redactor.event(e) for e in events]
