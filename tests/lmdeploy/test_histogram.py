"""The tier's cumulative histograms (lmdeploy_patch/histogram.py)."""
from __future__ import annotations

import pytest

from lmdeploy_patch.histogram import LATENCY_BOUNDS_S, SIZE_BOUNDS_BYTES, Histogram


def test_buckets_are_cumulative_and_inclusive():
    h = Histogram([1.0, 2.0, 4.0])
    for v in (0.5, 1.0, 1.5, 4.0, 9.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap["buckets"] == [("1.0", 2), ("2.0", 3), ("4.0", 4), ("+Inf", 5)]
    assert snap["count"] == 5 == h.count and snap["sum"] == pytest.approx(16.0)


def test_merge_adds_counts_and_refuses_other_bounds():
    a, b = Histogram([1.0]), Histogram([1.0])
    a.observe(0.5)
    b.observe(3.0)
    m = a.merge(b)
    assert m.snapshot()["buckets"] == [("1.0", 1), ("+Inf", 2)] and a.count == 1
    with pytest.raises(ValueError, match="different bounds"):
        a.merge(Histogram([2.0]))
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram([2.0, 1.0])


def test_default_bounds_are_increasing():
    Histogram(LATENCY_BOUNDS_S)
    Histogram(SIZE_BOUNDS_BYTES)
