"""Latency statistics (streamingllm.bench.stats): hand-computed values, numpy, bad input."""

from __future__ import annotations

import pytest

from streamingllm import bench


def test_latency_stats_odd_count_hand_computed():
    # sorted ms: 1 2 3 4 10; median = 3; p90: h = 4 * 0.9 = 3.6 -> 4 + 0.6 * (10 - 4) = 7.6
    s = bench.latency_stats([0.004, 0.001, 0.003, 0.010, 0.002])
    assert s["n"] == 5
    assert s["median_ms"] == pytest.approx(3.0)
    assert s["p90_ms"] == pytest.approx(7.6)
    assert s["p99_ms"] == pytest.approx(9.76)  # h = 3.96 -> 4 + 0.96 * 6
    assert s["mean_ms"] == pytest.approx(4.0)


def test_latency_stats_even_count_and_single_sample():
    # sorted ms: 1 2 3 4; median: h = 1.5 -> 2.5; p90: h = 2.7 -> 3 + 0.7 = 3.7
    s = bench.latency_stats([0.002, 0.004, 0.001, 0.003])
    assert (s["median_ms"], s["p90_ms"], s["mean_ms"]) == pytest.approx((2.5, 3.7, 2.5))
    one = bench.latency_stats([0.05])
    assert (one["median_ms"], one["p90_ms"], one["mean_ms"], one["n"]) == pytest.approx((50.0, 50.0, 50.0, 1))


@pytest.mark.parametrize("samples, error, message", [
    ([], ValueError, "empty"),
    ([0.1, -0.2], ValueError, "finite and >= 0"),
    ([0.1, float("nan")], ValueError, "finite"),
    (["one"], TypeError, "numbers"),
    (0.5, TypeError, "sequence"),
])
def test_latency_stats_rejects_bad_samples(samples, error, message):
    with pytest.raises(error, match=message):
        bench.latency_stats(samples)


def test_speedups_and_ratios_from_given_rows():
    rows = [
        {"size": 256, "method": "streaming", "median_ms": 2.0},
        {"size": 256, "method": "recompute", "median_ms": 90.0},
        {"size": 256, "method": "dense", "median_ms": 2.5},
        {"size": 1024, "method": "streaming", "median_ms": 4.0},
        {"size": 1024, "method": "recompute", "median_ms": 600.0},
        {"size": 4096, "method": "streaming", "median_ms": 8.0},  # no recompute arm at this size
    ]
    assert bench.speedups(rows) == pytest.approx({256: 45.0, 1024: 150.0})
    assert bench.speedups(rows, method="dense") == pytest.approx({256: 36.0})
    bench.add_ratios(rows)
    assert rows[0]["vs_dense"] == pytest.approx(0.8) and rows[0]["speedup_vs_recompute"] == pytest.approx(45.0)
    assert rows[3]["vs_dense"] is None and rows[3]["speedup_vs_recompute"] == pytest.approx(150.0)
    assert rows[5]["vs_dense"] is None and rows[5]["speedup_vs_recompute"] is None


def test_arm_stats_gives_each_arm_its_summary_and_its_ratio_to_the_baseline():
    s = bench.arm_stats({"new": [0.003, 0.001, 0.002], "ref": [0.004, 0.004], "slow": [0.008]}, baseline="ref")
    assert s["new"]["median_ms"] == pytest.approx(2.0) and s["new"]["n"] == 3
    assert s["new"]["vs_baseline"] == pytest.approx(0.5)
    assert s["ref"]["vs_baseline"] == pytest.approx(1.0) and s["slow"]["vs_baseline"] == pytest.approx(2.0)
    assert bench.arm_stats({"a": [0.001]})["a"]["vs_baseline"] is None
    with pytest.raises(ValueError, match=r"baseline must be one of the arms \(a\), got 'b'"):
        bench.arm_stats({"a": [0.001]}, baseline="b")
