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

Fail closed: if a pattern does not compile, every string value is replaced by ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"


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
        found = [sp for rx in self.compiled for sp in _spans(rx, value)]
        return _mask(value, found) if found else value

    def _list(self, value: list[Any] | tuple[Any, ...]) -> tuple[list[Any], bool]:
        """Each string element alone, and all of them as one space-joined command line."""
        if self.fail_closed:
            return [MASK if isinstance(v, str) else v for v in value], any(
                isinstance(v, str) for v in value
            )
        parts = [v if isinstance(v, str) else "" for v in value]
        line = " ".join(parts)
        joined = [sp for rx in self.compiled for sp in _spans(rx, line)]
        out, changed, offset = [], False, 0
        for v, part in zip(value, parts, strict=True):
            end = offset + len(part)
            if isinstance(v, str):
                found = [sp for rx in self.compiled for sp in _spans(rx, v)]
                found += [
                    (max(s, offset) - offset, min(e, end) - offset)
                    for s, e in joined
                    if s < end and e > offset
                ]
                if found:
                    new = _mask(v, found)
                    changed |= new != v
                    v = new
            out.append(v)
            offset = end + 1
        return out, changed

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
            if isinstance(arg, Mapping):
                value, changed = self._value(arg.get("value"))
                if changed:
                    arg = {**arg, "value": value, "redacted": True}
            else:
                value, changed = self._value(arg)
                if changed:
                    arg = {"value": value, "status": "ok", "redacted": True}
            changed_any |= changed
            new_args[name] = arg
        if not changed_any:
            return event
        return {**event, "args": new_args}


def _spans(rx: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    """What ``rx`` masks in ``text``: its groups, or whole matches without groups."""
    out = []
    for m in rx.finditer(text):
        if rx.groups:
            out += [m.span(g) for g in range(1, rx.groups + 1) if m.start(g) < m.end(g)]
        elif m.start() < m.end():
            out.append(m.span())
    return out


def _mask(text: str, found: Iterable[tuple[int, int]]) -> str:
    """``text`` with every span (merged where they touch) replaced by MASK."""
    merged: list[list[int]] = []
    for s, e in sorted(found):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    out, pos = [], 0
    for s, e in merged:
        out += [text[pos:s], MASK]
        pos = e
    out.append(text[pos:])
    return "".join(out)


def redact_events(
    redactor: Redactor, events: Iterable[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    return [redactor.event(e) for e in events]
