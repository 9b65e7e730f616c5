"""Small statistics for the benchmark's figures (no numpy)."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p * len(ordered)))
    return ordered[min(len(ordered), rank) - 1]


def busiest_window(times: Sequence[float], width: float = 1.0) -> int:
    """The most events in any window ``[t, t + width)`` (sliding), of sorted ``times``."""
    best = 0
    for i, start in enumerate(times):
        best = max(best, bisect.bisect_left(times, start + width, lo=i) - i)
    return best


def worst_gap(times: Sequence[float], start: float, end: float) -> float:
    """The longest stretch of ``[start, end]`` without one of the sorted ``times`` in it."""
    inside = [t for t in times if start <= t <= end]
    if not inside:
        return end - start
    edges = [start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(edges))


def mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else math.nan


def seconds(value: float) -> str:
    """``0.123 s`` / ``12.3 s`` / ``n/a``."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
