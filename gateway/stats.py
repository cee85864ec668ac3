"""Small measurement helpers shared by the supervisor, the uplink and the metrics page."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds; Prometheus-style cumulative buckets, fine enough that a percentile read from them
# (the bucket's upper bound) is within about 25 % of the true value from 0.25 ms to 100 ms.
DEFAULT_BUCKETS_S: tuple[float, ...] = (
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)


@dataclass(slots=True)
class LatencyHistogram:
    """A fixed-bucket histogram: constant memory however long the gateway runs."""

    buckets: tuple[float, ...] = DEFAULT_BUCKETS_S
    counts: list[int] = field(default_factory=list)  # one per bucket plus +Inf
    total: int = 0
    sum_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += 1
        self.sum_s += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs, the last bound being +inf."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile q (an over-estimate, never an under-one)."""
        if self.total == 0:
            return None
        rank = q * self.total
        for bound, running in self.cumulative():
            if running >= rank:
                return bound
        return float("inf")


def percentile(values: list[float], q: float) -> float | None:
    """Exact percentile (nearest rank) of a list; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[idx]
