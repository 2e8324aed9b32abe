"""The one histogram of the agent, the controller and their metrics endpoints.

``counts[i]`` counts the values ``<= bounds[i]`` (and above the previous bound); the last
count is the +Inf bucket, so there is one more count than bounds. Histograms are added
bucket by bucket; two with different bounds are refused (HistogramMismatch) rather than
approximated. Prometheus wants the cumulative form: ``cumulative_buckets()``.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Capture latency (syscall entry -> decoded in the agent), seconds: the bounds every engine
# reports with, so the controller can add the fleet's histograms exactly.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class HistogramMismatch(ValueError):
    pass


@dataclass(slots=True)
class Histogram:
    """Non-cumulative bucket counts over ``bounds`` plus the +Inf bucket, and the sum of the
    observed values. ``counts`` left empty means all zeros."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_SECONDS
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.bounds = tuple(float(b) for b in self.bounds)
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        elif len(self.counts) != len(self.bounds) + 1:
            raise HistogramMismatch(
                f"histogram has {len(self.counts)} counts for {len(self.bounds)} bounds "
                f"(want bounds + 1, the last bucket is +Inf)"
            )
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds, strict=False)):
            raise HistogramMismatch("histogram bounds are not strictly increasing")

    @classmethod
    def empty(cls, bounds: Sequence[float] = LATENCY_BUCKETS_SECONDS) -> Histogram:
        return cls(tuple(bounds))

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def bucket(self, value: float) -> int:
        """Index of the bucket ``value`` falls in: the first bound >= value (len(bounds) for
        +Inf)."""
        return bisect_left(self.bounds, value)

    def observe(self, value: float) -> None:
        # per decoded event in the agent: bisect (C) rather than a Python loop over bounds
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        """observe() for each value, in bulk: one sort and one bisect per bound, no Python
        step per value (for batches nobody decodes: user_events' count-only path)."""
        vals = sorted(values)
        cum = [bisect_right(vals, b) for b in self.bounds]  # values <= each bound
        counts = [c - p for c, p in zip(cum, [0, *cum[:-1]], strict=True)]
        self.add_counts([*counts, len(vals) - (cum[-1] if cum else 0)], math.fsum(vals))

    def add_counts(self, counts: Sequence[int], sum_: float) -> None:
        """Add bucket counts over the same bounds in bulk (e.g. handed over by a compiled
        aggregator): ``counts`` has one entry per bucket, +Inf last."""
        if len(counts) != len(self.counts):
            raise HistogramMismatch(
                f"cannot add {len(counts)} bucket counts to a histogram of "
                f"{len(self.counts)} buckets"
            )
        for i, c in enumerate(counts):
            self.counts[i] += c
        self.sum += sum_

    def add(self, other: Histogram) -> None:
        """Add ``other`` into this histogram, bucket by bucket."""
        if other.bounds != self.bounds:
            raise HistogramMismatch(
                f"cannot merge histograms with different bounds ({len(self.bounds)} vs "
                f"{len(other.bounds)} bounds, first difference at "
                f"{_first_difference(self.bounds, other.bounds)})"
            )
        # one read of other's counts: a consumer thread may be adding to it
        self.add_counts(list(other.counts), other.sum)

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

    def cumulative_buckets(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound as text, cumulative count), ending with +Inf."""
        out = []
        acc = 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += c
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(acc)))
        return out


def _first_difference(a: Sequence[float], b: Sequence[float]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"bound {i}: {x!r} vs {y!r}"
    return f"bound {min(len(a), len(b))}"


def merge_histograms(hists: Iterable[Histogram]) -> Histogram | None:
    """Sum of histograms (a new one); None for an empty input."""
    out: Histogram | None = None
    for h in hists:
        if out is None:
            out = h.copy()
        else:
            out.add(h)
    return out
