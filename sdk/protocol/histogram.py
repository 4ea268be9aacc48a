"""Mergeable latency histograms with fixed log-spaced buckets.

Every agent uses the same bucket bounds, so histograms from any set of devices and intervals
add up bucket by bucket, and percentiles are computed on the merged counts. Bounds run from
10 µs to 100 s with ten buckets per decade (each ≈ 26 % wider than the last), which bounds the
relative error of a percentile estimate to about ±13 %.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

#: Upper bounds (ms) of buckets 0..N-2; bucket N-1 holds everything above the last bound.
BOUNDS_MS: tuple[float, ...] = tuple(0.01 * 10 ** (i / 10) for i in range(71))
N_BUCKETS = len(BOUNDS_MS) + 1


def bucket_of(latency_ms: float) -> int:
    """Index of the bucket that counts ``latency_ms``."""
    if not latency_ms > 0:  # also catches NaN
        return 0
    return bisect.bisect_left(BOUNDS_MS, latency_ms)


def empty() -> list[int]:
    return [0] * N_BUCKETS


def merge(histograms: Iterable[Sequence[int]]) -> list[int]:
    total = empty()
    for h in histograms:
        if len(h) != N_BUCKETS:
            raise ValueError(f"histogram has {len(h)} buckets, expected {N_BUCKETS}")
        for i, c in enumerate(h):
            total[i] += int(c)
    return total


def quantile(counts: Sequence[int], q: float) -> float | None:
    """Estimate the ``q`` quantile (0..1) in ms; ``None`` for an empty histogram.

    Within a bucket the estimate is interpolated geometrically between its bounds.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    n = sum(counts)
    if n == 0:
        return None
    rank = q * n
    seen = 0
    for i, c in enumerate(counts):
        if c == 0:
            continue
        if seen + c >= rank:
            lo = BOUNDS_MS[i - 1] if i > 0 else BOUNDS_MS[0] / 10 ** 0.1
            hi = BOUNDS_MS[i] if i < len(BOUNDS_MS) else BOUNDS_MS[-1] * 10 ** 0.1
            frac = min(max((rank - seen) / c, 0.0), 1.0)
            return math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo)))
        seen += c
    return BOUNDS_MS[-1]
