"""Exact aggregation: histograms add bucket by bucket, mismatched bounds are refused."""

import pytest

from tracefleet.agent.capture.engine import LATENCY_BUCKETS_SECONDS
from tracefleet.controller.domain.aggregate import (
    Hist,
    HistogramMismatch,
    NodeWindow,
    SetSample,
    merge_histograms,
)

B = (0.001, 0.01, 0.1)


def test_merge_is_exact_bucket_by_bucket():
    a = Hist(B, [1, 2, 3, 4], 1.5)
    b = Hist(B, [10, 0, 5, 1], 0.25)
    m = merge_histograms([a, b])
    assert m is not None
    assert m.counts == [11, 2, 8, 5]
    assert m.sum == 1.75
    assert m.count == 26
    assert a.counts == [1, 2, 3, 4]  # inputs untouched
    assert merge_histograms([]) is None


def test_merge_refuses_mismatched_bounds():
    a = Hist(B, [1, 2, 3, 4])
    with pytest.raises(HistogramMismatch, match="different bounds"):
        a.add(Hist((0.001, 0.02, 0.1), [1, 1, 1, 1]))
    with pytest.raises(HistogramMismatch):
        a.add(Hist((0.001, 0.01), [1, 1, 1]))
    assert a.counts == [1, 2, 3, 4]  # nothing half-added


def test_histogram_shape_is_validated():
    with pytest.raises(HistogramMismatch, match="bounds \\+ 1"):
        Hist(B, [1, 2, 3])
    with pytest.raises(HistogramMismatch, match="increasing"):
        Hist((0.1, 0.01), [0, 0, 0])


def test_quantile_interpolates_inside_the_bucket():
    h = Hist(B, [0, 10, 0, 0])
    assert h.quantile(0.5) == pytest.approx(0.001 + 0.009 * 0.5)
    assert Hist(B, [0, 0, 0, 3]).quantile(0.99) == 0.1  # +Inf bucket -> last bound
    assert Hist(B, [0, 0, 0, 0]).quantile(0.5) == 0.0


def test_engine_bounds_merge_with_themselves():
    n = len(LATENCY_BUCKETS_SECONDS) + 1
    a = Hist(LATENCY_BUCKETS_SECONDS, [1] * n, 1.0)
    a.add(Hist(LATENCY_BUCKETS_SECONDS, [2] * n, 2.0))
    assert a.counts == [3] * n


def test_window_rates_divide_by_covered_time_and_expire():
    w = NodeWindow(window=10.0)
    s = SetSample("file", {"openat": 30, "read": 10}, 40, 4, 2, Hist(B, [1, 0, 0, 0]))
    w.add(1.0, [s], now=100.0)
    w.add(1.0, [s], now=101.0)
    r = w.rates(now=101.5)["file"]
    assert r.events_per_second == 40.0
    assert r.drops_per_second == 4.0
    assert r.faults_per_second == 2.0
    assert r.syscalls_per_second == {"openat": 30.0, "read": 10.0}
    assert r.latency is not None and r.latency.counts == [2, 0, 0, 0]
    assert w.rates(now=200.0) == {}
