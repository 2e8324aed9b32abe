"""Redaction of sampled events before they leave the node (pure, no I/O).

The controller distributes regular expressions in ``DesiredState.redact_patterns``. Each is
applied to every string value of an event's args: plain string args, every entry of a list
value (``args.argv.value``) and every value of a mapping value. A pattern without groups
replaces the whole match with ``***``; a pattern with groups replaces each matched group only
(``--password=(\\S+)`` turns ``--password=hunter2`` into ``--password=***``). A changed
argument gets ``"redacted": True``.

Fail closed: if a pattern does not compile, every string value is replaced by ``***``; if
redacting one argument fails, that argument's value is replaced by ``***`` (counted in
``ERRORS`` under cause=redact, which the agent's metrics include) and the rest goes on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from tracefleet.agent._internal.contain import UNKNOWN_SET, ErrorCounter
from tracefleet.agent.eventsets import EVENT_SETS

MASK = "***"
# redaction failures of this process (Redactors are replaced when the patterns change)
ERRORS = ErrorCounter()


class Redactor:
    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        self.compiled: list[re.Pattern[str]] = []
        self.errors: list[str] = []
        for p in self.patterns:
            try:
                self.compiled.append(re.compile(p))
            except re.error as e:
                self.errors.append(f"{p!r}: {e}")
        self.fail_closed = bool(self.errors)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def text(self, value: str) -> str:
        if self.fail_closed:
            return MASK
        for rx in self.compiled:
            value = _sub(rx, value)
        return value

    def _value(self, value: Any) -> tuple[Any, bool]:
        if isinstance(value, str):
            new = self.text(value)
            return new, new != value
        if isinstance(value, list | tuple):
            out, changed = [], False
            for v in value:
                nv, c = self._value(v) if isinstance(v, str) else (v, False)
                out.append(nv)
                changed |= c
            return out, changed
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


def _sub(rx: re.Pattern[str], value: str) -> str:
    if rx.groups == 0:
        return rx.sub(MASK, value)

    def repl(m: re.Match[str]) -> str:
        text, start = m.group(0), m.start(0)
        out, pos = [], 0
        spans = sorted(
            (m.start(g) - start, m.end(g) - start)
            for g in range(1, rx.groups + 1)
            if m.start(g) >= 0
        )
        for s, e in spans:
            if s < pos:  # nested or overlapping groups: the outer one already masked it
                continue
            out += [text[pos:s], MASK]
            pos = e
        out.append(text[pos:])
        return "".join(out)

    return rx.sub(repl, value)


def redact_events(
    redactor: Redactor, events: Iterable[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    return [redactor.event(e) for e in events]
