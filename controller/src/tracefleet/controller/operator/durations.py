"""Human durations for the CLI: 90, 45s, 10m, 1h30m, 500ms, 2d."""

from __future__ import annotations

import math
import re

# Longest duration anything takes (a rule's TTL, a wait, a stream): a year and a day.
MAX_SECONDS = 366 * 86400.0

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Seconds, 0..MAX_SECONDS; ValueError with an example on bad input."""
    seconds = _parse(text)
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise ValueError(
            f"duration {text!r} is out of range: use 0 to {MAX_SECONDS / 86400:.0f}d, "
            "e.g. 30s, 10m, 1h30m"
        )
    return seconds


def _parse(text: str) -> float:
    t = text.strip().lower()
    try:
        value = float(t)
    except ValueError:
        pass
    else:
        if value < 0 or math.isnan(value):
            raise ValueError(f"bad duration {text!r}: use e.g. 30s, 10m, 1h30m or plain seconds")
        return value
    pos, total = 0, 0.0
    for m in _PART.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not t or pos != len(t):
        raise ValueError(f"bad duration {text!r}: use e.g. 30s, 10m, 1h30m or plain seconds")
    return total
