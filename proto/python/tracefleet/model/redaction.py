"""Redaction rules and matching, one home for the agent and the controller.

The controller sends the effective patterns (these defaults, minus the ones the policy file
relaxes, plus its own) to every agent, which masks values before they leave the node, per
argv element and over the whole command line (``['--password', 'hunter2']``). The controller
applies the same patterns again to every sampled event it receives, so an agent that did not
(an older or a hostile one) cannot show a secret to an operator (the read role included).

A pattern with groups masks its groups only; without groups, the whole match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

MASK = "***"

_KEYWORDS = (
    r"passw(?:or)?d|secret|token|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|client[_-]?secret|credentials?|authorization"
)
# name -> regex; the names are what ``redact_relax`` in the policy file refers to.
DEFAULT_RULES: dict[str, str] = {
    # --password=x, --db-password x, -token x; the value may be the next argv element (in a
    # joined command line, or in an argv list's text form: "'--password', 'x'")
    "flag": rf"(?i)(?<![\w])-{{1,2}}[\w.-]*(?:{_KEYWORDS})[\w.-]*(?:[=\s]\s*|['\"],\s*['\"])"
    r"([^\s'\"]+)",
    # PGPASSWORD=x, AWS_SECRET_ACCESS_KEY=x, api_token=x
    "env": rf"(?i)(?<![\w-])[\w.]*(?:{_KEYWORDS})[\w.]*=([^\s'\"&]+)",
    # X-Auth-Token: x, Authorization: Basic x
    "header": rf"(?i)\b[\w-]*(?:{_KEYWORDS}):\s*(?:(?:basic|bearer|token)\s+)?([^\s'\"]+)",
    # Bearer x
    "bearer": r"(?i)\bbearer\s+([\w.~+/=-]+)",
    # scheme://user:password@host
    "url": r"(?i)\b[a-z][a-z0-9+.-]*://[^\s/@:'\"]*:([^\s/@'\"]+)@",
}


def default_patterns(relax: Iterable[str] = ()) -> tuple[str, ...]:
    relaxed = set(relax)
    return tuple(p for name, p in DEFAULT_RULES.items() if name not in relaxed)


def spans(rx: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    """What ``rx`` masks in ``text``: its groups, or whole matches without groups."""
    out = []
    for m in rx.finditer(text):
        if rx.groups:
            out += [m.span(g) for g in range(1, rx.groups + 1) if m.start(g) < m.end(g)]
        elif m.start() < m.end():
            out.append(m.span())
    return out


def mask(text: str, found: Iterable[tuple[int, int]]) -> str:
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


class Patterns:
    """Compiled redaction patterns applied to one string, or to an argv list."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.compiled = [re.compile(p) for p in patterns]  # re.error if one is bad

    def text(self, value: str) -> str:
        found = [sp for rx in self.compiled for sp in spans(rx, value)]
        return mask(value, found) if found else value

    def strings(self, values: Sequence[object]) -> tuple[list[object], bool]:
        """Each string element alone, and all of them as one space-joined command line, so
        ``['--password', 'hunter2']`` masks the second element. Non-strings pass through."""
        parts = [v if isinstance(v, str) else "" for v in values]
        line = " ".join(parts)
        joined = [sp for rx in self.compiled for sp in spans(rx, line)]
        out: list[object] = []
        changed, offset = False, 0
        for v, part in zip(values, parts, strict=True):
            end = offset + len(part)
            if isinstance(v, str):
                found = [sp for rx in self.compiled for sp in spans(rx, v)]
                found += [
                    (max(s, offset) - offset, min(e, end) - offset)
                    for s, e in joined
                    if s < end and e > offset
                ]
                if found:
                    new = mask(v, found)
                    changed |= new != v
                    v = new
            out.append(v)
            offset = end + 1
        return out, changed
