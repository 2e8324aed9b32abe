"""argparse types shared by ``tracefleet-agent`` and ``tracefleet``."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_in(what: str, low: int, high: int, hint: str = "") -> Callable[[str], int]:
    """argparse type: a whole number low..high (never truncated into a kernel field), with
    the range, and ``hint`` on how to pick one, in the error."""
    why = f": {hint}" if hint else ""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be a whole number {low}..{high}, not {text[:40]!r}{why}"
            ) from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(
                f"{what} must be {low}..{high}, not {text[:40]!r}{why}"
            )
        return v

    return parse
