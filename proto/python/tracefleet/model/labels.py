"""Node labels (``key=value[,key=value]``): Kubernetes label syntax, checked the same way by
the agent (before it registers) and the controller (when it does)."""

from __future__ import annotations

import re

LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
LABEL_KEY_MAX = 253
SYNTAX = (
    "keys and values as in Kubernetes ([A-Za-z0-9._-], optional dns-prefix/ on keys, values "
    "up to 63 characters)"
)


def label_ok(key: str, value: str) -> bool:
    return (
        len(key) <= LABEL_KEY_MAX
        and LABEL_KEY.fullmatch(key) is not None
        and LABEL_VALUE.fullmatch(value) is not None
    )


def parse_labels(text: str) -> dict[str, str]:
    """``key=value[,key=value]`` -> dict (blanks around items, keys and values dropped);
    ValueError naming the bad item and the syntax."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"bad label {item[:80]!r}: use key=value[,key=value]")
        if not label_ok(key, value):
            raise ValueError(f"bad label {item[:80]!r}: {SYNTAX}")
        out[key] = value
    return out
