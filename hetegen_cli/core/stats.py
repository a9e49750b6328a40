"""Summary statistics of repeated measurements (pure Python): the one helper for profile,
bench and scripts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """{"mean", "sd" (sample, n-1; 0 for one sample), "median", "min", "max", "n",
    "samples"} of a non-empty sequence."""
    values = [float(v) for v in samples]
    n = len(values)
    if n == 0:
        raise ValueError("summarize() needs at least one sample")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    ordered = sorted(values)
    mid = n // 2
    median = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {
        "mean": mean,
        "sd": sd,
        "median": median,
        "min": ordered[0],
        "max": ordered[-1],
        "n": n,
        "samples": values,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator
