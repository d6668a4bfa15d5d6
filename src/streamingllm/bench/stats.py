"""Latency statistics: per-token summaries and the ratios between arms.

Ratios are taken between the arms of one interleaved run (:mod:`.schedule`), never between
numbers from separate runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from ..checks import ArgumentError, ArgumentTypeError


def latency_stats(samples_s: Iterable[float]) -> dict:
    """Summary of per-token latencies.

    Args:
        samples_s: latencies in **seconds** (finite, >= 0), at least one.

    Returns:
        ``{"median_ms", "p90_ms", "p99_ms", "mean_ms", "n"}``: median, 90th and 99th percentiles
        (numpy's linear interpolation between closest ranks) and arithmetic mean, in
        **milliseconds**, and the number of samples.
    """
    try:
        xs = np.asarray([float(x) for x in samples_s], dtype=np.float64) * 1e3
    except (TypeError, ValueError):
        raise ArgumentTypeError("samples_s", "must be a sequence of numbers (seconds)", samples_s) from None
    if not xs.size:
        raise ArgumentError("samples_s", "is empty: give at least one latency (seconds)")
    if not np.isfinite(xs).all() or (xs < 0).any():
        raise ArgumentError("samples_s", "must be finite and >= 0 (seconds)", samples_s)
    median, p90, p99 = np.percentile(xs, [50, 90, 99])
    return {"median_ms": float(median), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(xs.mean()),
            "n": int(xs.size)}


def arm_stats(times_s: Mapping[str, Iterable[float]], baseline: str | None = None) -> dict[str, dict]:
    """:func:`latency_stats` of each arm of one interleaved run, and its ratio to the baseline arm.

    Args:
        times_s: ``{arm: latencies in seconds}``, as :func:`~streamingllm.bench.schedule.interleave` returns.
        baseline: the arm the others are compared with (one of ``times_s``), or None for no ratios.

    Returns:
        ``{arm: {"median_ms", "p90_ms", "mean_ms", "n", "vs_baseline"}}``: ``vs_baseline`` is the
        arm's median over the baseline's (below 1: faster than the baseline); None without a baseline
        (or when the baseline's median is 0).
    """
    if baseline is not None and baseline not in times_s:
        raise ArgumentError("baseline", f"must be one of the arms ({', '.join(map(str, times_s))})", baseline)
    out = {arm: latency_stats(xs) for arm, xs in times_s.items()}
    base = None if baseline is None else out[baseline]["median_ms"]
    for s in out.values():
        s["vs_baseline"] = s["median_ms"] / base if base else None
    return out


def _medians(rows: Iterable[dict]) -> dict[tuple[int, str], float]:
    return {(r["size"], r["method"]): r["median_ms"] for r in rows}


def speedups(rows: Iterable[dict], baseline: str = "recompute", method: str = "streaming") -> dict[int, float]:
    """``baseline``'s median latency divided by ``method``'s, per cache size (sizes with both arms)."""
    med = _medians(rows)
    return {n: med[(n, baseline)] / med[(n, m)] for (n, m) in med if m == method and (n, baseline) in med}


def add_ratios(rows: list[dict]) -> None:
    """Fill ``vs_dense``, ``vs_dense_compiled``, ``vs_llamacpp`` (median / that arm's median) and
    ``speedup_vs_recompute`` (recompute median / median) in each decode row; None where that arm
    did not run at the row's size."""
    med = _medians(rows)
    for r in rows:
        for key, arm in (("vs_dense", "dense"), ("vs_dense_compiled", "dense-compiled"), ("vs_llamacpp", "llama.cpp")):
            other = med.get((r["size"], arm))
            r[key] = r["median_ms"] / other if other else None
        rc = med.get((r["size"], "recompute"))
        r["speedup_vs_recompute"] = rc / r["median_ms"] if rc else None
