"""Latency statistics: percentiles, per-token summaries and the ratios between arms."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Real

import torch

from ..checks import ArgumentError, ArgumentTypeError, check_float


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 <= q <= 100) by linear interpolation between closest ranks.

    With the samples sorted as ``x[0] <= ... <= x[n-1]`` and ``h = (n - 1) * q / 100``, the
    result is ``x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)])`` (numpy's
    default "linear" method, R type 7). The 50th percentile is the usual median.
    """
    q = check_float("q", q, 0, 100)
    xs = sorted(samples)
    if not xs:
        raise ArgumentError("samples", "must hold at least one value")
    h = (len(xs) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def latency_stats(samples_s: Iterable[float]) -> dict:
    """Summary of per-token latencies.

    Args:
        samples_s: latencies in **seconds** (finite, >= 0), at least one.

    Returns:
        ``{"median_ms", "p90_ms", "mean_ms", "n"}``: median and 90th percentile (both by
        :func:`percentile`'s linear interpolation) and arithmetic mean, in **milliseconds**,
        and the number of samples.
    """
    if isinstance(samples_s, (str, bytes)) or not isinstance(samples_s, Iterable):
        raise ArgumentTypeError("samples_s", "must be a sequence of latencies in seconds", samples_s)
    xs = []
    for x in samples_s:
        x = x.item() if torch.is_tensor(x) else x
        if isinstance(x, bool) or not isinstance(x, Real):
            raise ArgumentTypeError("samples_s", "must hold numbers (seconds)", x)
        if not math.isfinite(x) or x < 0:
            raise ArgumentError("samples_s", "must be finite and >= 0 (seconds)", x)
        xs.append(float(x) * 1e3)
    if not xs:
        raise ArgumentError("samples_s", "is empty: give at least one latency (seconds)")
    return {"median_ms": percentile(xs, 50), "p90_ms": percentile(xs, 90), "mean_ms": sum(xs) / len(xs), "n": len(xs)}


def _medians(rows: Iterable[dict]) -> dict[tuple[int, str], float]:
    return {(r["size"], r["method"]): r["median_ms"] for r in rows}


def speedups(rows: Iterable[dict], baseline: str = "recompute", method: str = "streaming") -> dict[int, float]:
    """``baseline``'s median latency divided by ``method``'s, per cache size (sizes with both arms)."""
    med = _medians(rows)
    return {n: med[(n, baseline)] / med[(n, m)] for (n, m) in med if m == method and (n, baseline) in med}


def add_ratios(rows: list[dict]) -> None:
    """Fill ``vs_dense`` (median / dense median) and ``speedup_vs_recompute`` (recompute median /
    median) in each decode row; None where that arm did not run at the row's size."""
    med = _medians(rows)
    for r in rows:
        d, rc = med.get((r["size"], "dense")), med.get((r["size"], "recompute"))
        r["vs_dense"] = r["median_ms"] / d if d else None
        r["speedup_vs_recompute"] = rc / r["median_ms"] if rc else None
