"""Exact merging of what agents report, and rates over a recent window.

Histograms are added bucket by bucket; two histograms with different bounds are refused
(HistogramMismatch) rather than approximated.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

FAULT_OUTCOMES = frozenset({"recovered", "lost"})


class HistogramMismatch(ValueError):
    pass


@dataclass
class Hist:
    bounds: tuple[float, ...]
    counts: list[int]
    sum: float = 0.0

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            raise HistogramMismatch(
                f"histogram has {len(self.counts)} counts for {len(self.bounds)} bounds "
                f"(want bounds + 1, the last bucket is +Inf)"
            )
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds, strict=False)):
            raise HistogramMismatch("histogram bounds are not strictly increasing")

    @classmethod
    def empty(cls, bounds: Sequence[float]) -> Hist:
        return cls(tuple(bounds), [0] * (len(bounds) + 1), 0.0)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: Hist) -> None:
        """Add ``other`` into this histogram, bucket by bucket."""
        if other.bounds != self.bounds:
            raise HistogramMismatch(
                f"cannot merge histograms with different bounds ({len(self.bounds)} vs "
                f"{len(other.bounds)} bounds, first difference at "
                f"{_first_difference(self.bounds, other.bounds)})"
            )
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.sum += other.sum

    def quantile(self, q: float) -> float:
        """Estimate of the q-quantile: linear inside the bucket holding it; a value in the
        +Inf bucket is reported as the last finite bound."""
        total = self.count
        if total == 0:
            return 0.0
        rank = q * total
        seen = 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                if i >= len(self.bounds):
                    return self.bounds[-1] if self.bounds else 0.0
                lo = self.bounds[i - 1] if i > 0 else 0.0
                return lo + (self.bounds[i] - lo) * max(0.0, rank - seen) / c
            seen += c
        return self.bounds[-1] if self.bounds else 0.0


def _first_difference(a: Sequence[float], b: Sequence[float]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"bound {i}: {x!r} vs {y!r}"
    return f"bound {min(len(a), len(b))}"


def merge_histograms(hists: Iterable[Hist]) -> Hist | None:
    """Sum of histograms (a new one); None for an empty input."""
    out: Hist | None = None
    for h in hists:
        if out is None:
            out = Hist(h.bounds, list(h.counts), h.sum)
        else:
            out.add(h)
    return out


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
                        r.latency = Hist(s.latency.bounds, list(s.latency.counts), s.latency.sum)
                    else:
                        r.latency.add(s.latency)
        for name, r in totals.items():
            r.events_per_second /= covered
            r.drops_per_second /= covered
            r.faults_per_second /= covered
            r.syscalls_per_second = {k: v / covered for k, v in syscalls[name].items()}
        return totals
