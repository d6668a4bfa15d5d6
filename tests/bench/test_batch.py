"""Batched decode (streamingllm.bench.batch) on a tiny model; no timing is asserted."""

from __future__ import annotations

import math

import pytest
from streamingllm import bench
from streamingllm.report import write_csv


def test_bench_batch_rows_and_ratios_against_the_smallest_batch(llama, tmp_path, read_csv):
    seen = []
    rows = bench.bench_batch(llama, batch=[4, 1, 2], sizes=[8, 16], steps=3, warmup=1, block=2, progress=False,
                             on_row=seen.append)
    assert [(r["size"], r["batch"]) for r in rows] == [(n, b) for n in (8, 16) for b in (1, 2, 4)]
    assert seen == rows
    for r in rows:
        one = next(x for x in rows if x["size"] == r["size"] and x["batch"] == 1)
        assert r["steps"] == 3 and 0 < r["median_ms"] <= r["p90_ms"] and r["mean_ms"] > 0
        assert r["step_ratio"] == pytest.approx(r["median_ms"] / one["median_ms"])
        assert r["tokens_per_s"] == pytest.approx(1e3 * r["batch"] / r["median_ms"])
        assert r["median_ms"] <= r["p99_ms"] and r["vs_limit"] == pytest.approx(r["median_ms"] / r["limit_ms"])
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / one["tokens_per_s"])
        assert r["stacked"] == (r["batch"] > 1)  # Llama's streams share one forward
    header, table = read_csv(write_csv(rows, tmp_path / "batch.csv", bench.BATCH_COLUMNS))
    assert header == bench.BATCH_COLUMNS and len(table) == 6
    assert all(math.isfinite(float(line[c])) for line in table for c in ("median_ms", "tokens_per_s", "speedup"))
    text = bench.batch_table(rows).splitlines()
    assert text[0].split()[:3] == ["size", "streams", "ms"] and len(text) == 9  # header, rule, 6 rows, legend


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(batch=[0, 2]), ValueError, "batch must be an integer >= 1, got 0"),
    (dict(batch=[2, 2]), ValueError, "batch must not repeat a value"),
    (dict(batch=[]), ValueError, "batch must list at least one"),
    (dict(sizes=[4]), ValueError, "sizes must each be > the sink size"),
    (dict(steps=0), ValueError, "steps must be an integer >= 1"),
    (dict(block=0), ValueError, "block must be an integer >= 1"),
])
def test_bench_batch_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        bench.bench_batch(None, progress=False, **{"sizes": [16], **kwargs})  # refused before the model is touched
