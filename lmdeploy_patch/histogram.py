"""A cumulative histogram in Prometheus' shape (buckets counted by upper
bound, inclusive; a sum and a count), kept by the tier itself so that the
figures stay cumulative whoever reads them and however often
(metrics_export.py turns a snapshot into a Prometheus histogram)."""
from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

# Restore latency, plan to copy complete: 100 us (a few blocks over PCIe) to
# 10 s (a backlogged stream of a long context).
LATENCY_BOUNDS_S = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Restore size per request, bytes over all ranks: 64 KiB (one int4 block of a
# small model) to 16 GiB (a 100K-token bf16 context of a 70B model).
SIZE_BOUNDS_BYTES = tuple(float(1 << s) for s in range(16, 35, 2))


class Histogram:
    def __init__(self, bounds: Sequence[float]):
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must be strictly increasing, got {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merge(self, other: "Histogram") -> "Histogram":
        """A new histogram holding both (same bounds)."""
        if other.bounds != self.bounds:
            raise ValueError("histograms with different bounds cannot be merged")
        out = Histogram(self.bounds)
        out.counts = [a + b for a, b in zip(self.counts, other.counts)]
        out.sum = self.sum + other.sum
        return out

    def snapshot(self) -> dict:
        """{"buckets": [(upper bound as Prometheus writes it, cumulative count)], "sum": s, "count": n}."""
        buckets, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return {"buckets": buckets, "sum": self.sum, "count": total}
