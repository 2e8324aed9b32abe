"""Exact merging of what agents report, and rates over a recent window.

Histograms (``tracefleet.model.histogram``) are added bucket by bucket; two histograms with
different bounds are refused (HistogramMismatch) rather than approximated.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from tracefleet.model.histogram import Histogram, HistogramMismatch, merge_histograms
from tracefleet.model.names import FAULT_OUTCOMES

# One histogram type for agent and controller (``Hist`` is its older name here).
Hist = Histogram


@dataclass
class SetSample:
    """One event set in one reported interval, reduced to what rates need."""

    event_set: str
    events_by_syscall: dict[str, int]
    delivered: int
    dropped: int
    faults: int
    latency: Hist | None


@dataclass
class _Entry:
    received: float  # monotonic seconds
    duration: float  # seconds covered
    sets: list[SetSample]


@dataclass
class SetRates:
    events_per_second: float = 0.0
    drops_per_second: float = 0.0
    faults_per_second: float = 0.0
    syscalls_per_second: dict[str, float] = field(default_factory=dict)
    latency: Hist | None = None


__all__ = ["FAULT_OUTCOMES", "Hist", "Histogram", "HistogramMismatch", "merge_histograms"]


class NodeWindow:
    """The intervals one node reported within the last ``window`` seconds."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._entries: deque[_Entry] = deque()

    def add(self, duration: float, sets: list[SetSample], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._entries.append(_Entry(now, max(duration, 0.0), sets))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._entries and self._entries[0].received < now - self.window:
            self._entries.popleft()

    def rates(self, now: float | None = None) -> dict[str, SetRates]:
        """Per event set: counts in the window divided by the time the intervals cover."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        covered = sum(e.duration for e in self._entries)
        if covered <= 0:
            return {}
        totals: dict[str, SetRates] = {}
        syscalls: dict[str, Counter[str]] = {}
        for e in self._entries:
            for s in e.sets:
                r = totals.setdefault(s.event_set, SetRates())
                r.events_per_second += s.delivered
                r.drops_per_second += s.dropped
                r.faults_per_second += s.faults
                syscalls.setdefault(s.event_set, Counter()).update(s.events_by_syscall)
                if s.latency is not None:
                    if r.latency is None:
                        r.latency = s.latency.copy()
                    else:
                        r.latency.add(s.latency)
        for name, r in totals.items():
            r.events_per_second /= covered
            r.drops_per_second /= covered
            r.faults_per_second /= covered
            r.syscalls_per_second = {k: v / covered for k, v in syscalls[name].items()}
        return totals
