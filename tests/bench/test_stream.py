"""The stream benchmark (streamingllm.bench.stream) on a tiny model; no timing is asserted."""

from __future__ import annotations

import math

import pytest
import torch

from streamingllm import SinkCache, bench, generate_tokens
from streamingllm.report import write_csv
from tiny import VOCAB


def test_bench_stream_generate_end_to_end(llama, tmp_path, read_csv, assert_png):
    res = bench.bench_stream(llama, 400, sample_every=100, max_dense_tokens=250, window_size=28, progress=False)
    stream = [r for r in res.rows if r["method"] == "streaming"]
    dense = [r for r in res.rows if r["method"] == "dense"]
    assert [r["tokens"] for r in stream] == [100, 200, 300, 400]
    assert [r["tokens"] for r in dense] == [100, 200, 250]  # stopped by max_dense_tokens, last sample at the stop
    assert res.dense_tokens == 250 and res.dense_stop == "max_dense_tokens"
    assert all(r["cached_tokens"] == 32 for r in stream)
    assert [r["cached_tokens"] for r in dense] == [100, 200, 250]
    assert len({r["state_mib"] for r in stream}) == 1  # flat
    assert dense[0]["state_mib"] < dense[1]["state_mib"] < dense[2]["state_mib"]  # grows
    assert res.full.tokens == 32 and res.end.tokens == 400 and res.full.gpu_mib is None  # CPU
    assert res.storage_unchanged and res.storage_growth_bytes == 0
    assert res.token_ids == {}  # only with keep_ids
    assert "0 bytes" in bench.stream_summary(res)
    assert "dense arm stopped after 250 tokens (max_dense_tokens)" in bench.stream_table(res)

    header, table = read_csv(write_csv(res.rows, tmp_path / "stream.csv", bench.STREAM_COLUMNS))
    assert header == bench.STREAM_COLUMNS and len(table) == 7
    assert all(math.isfinite(float(line[c])) for line in table for c in header if c not in ("method", "gpu_mib"))
    assert all(line["gpu_mib"] == "" for line in table)  # CPU: no CUDA memory column values
    assert_png(bench.plot_stream(res.rows, tmp_path / "stream.png"))


def test_streaming_storage_does_not_grow_teacher_forced_chunks(llama):
    res = bench.bench_stream(llama, 5000, sample_every=1000, mode="teacher-forced", methods=["streaming"],
                             window_size=60, chunk_size=256, progress=False)
    assert [r["tokens"] for r in res.rows] == [1024, 2048, 3072, 4096, 5000]  # first chunk end past each 1000
    assert res.full.tokens <= 256 and res.full.storage and res.full.storage == res.end.storage
    assert res.storage_growth_bytes == 0 and res.storage_unchanged
    assert all(r["cached_tokens"] == 64 for r in res.rows)


def test_bench_stream_repeats_given_ids(llama):
    ids = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(1))
    res = bench.bench_stream(llama, 300, sample_every=300, mode="teacher-forced", methods=["streaming"],
                             window_size=28, chunk_size=64, token_ids=ids, progress=False)
    assert res.rows[-1]["tokens"] == 300  # 100 ids repeated to 300
    with pytest.raises(ValueError, match=f"token_ids must be ids in \\[0, {VOCAB}\\)"):
        bench.bench_stream(llama, 300, methods=["dense"], token_ids=[VOCAB], progress=False)


def test_compiled_steps_generate_exactly_the_ordinary_tokens(llama, compile_as_identity):
    """compile=True runs every step after the cache filled prepared (SinkCache.prepare_decode_step,
    static shapes); torch.compile is the identity here, so the prepared path itself must generate
    the very tokens of ordinary steps and of feed.generate_tokens (greedy)."""
    kw = dict(num_tokens=60, sample_every=30, methods=["streaming"], window_size=16, token_ids=[93], progress=False,
              keep_ids=True)
    compiled = bench.bench_stream(llama, compile=True, **kw)
    assert len(compile_as_identity.calls) == 60 - 20  # every step after the cache (4 + 16) filled went the prepared way
    assert compiled.storage_unchanged
    plain = bench.bench_stream(llama, compile=False, **kw)
    reference = [int(t) for t in generate_tokens(llama, SinkCache(llama, 4, 16), [93], max_new_tokens=60)]
    assert len(reference) == 60 and len(set(reference[20:])) >= 8  # still changing after the cache filled
    assert compiled.token_ids["streaming"] == plain.token_ids["streaming"] == reference
    with pytest.raises(TypeError, match="compile must be True or False"):
        bench.bench_stream(llama, 10, compile="yes", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tokens=0), "num_tokens must be an integer >= 1"),
    (dict(sample_every=0), "sample_every must be an integer >= 1"),
    (dict(max_dense_tokens=-1), "max_dense_tokens must be an integer >= 0"),
    (dict(mode="beam"), "mode must be one of generate, teacher-forced, got 'beam'"),
    (dict(chunk_size=8), "chunk_size must be 1 in generate mode"),
    (dict(methods=["recompute"]), "methods must be one of streaming, dense"),
    (dict(window_size=0), "window_size must be an integer >= 1"),
    (dict(window_size=96), "num_tokens must exceed the streaming cache \\(sink_size \\+ window_size = 100 tokens\\)"),
])
def test_bench_stream_bad_arguments(kwargs, message):
    kwargs = {"num_tokens": 100, "window_size": 20, **kwargs}
    with pytest.raises(ValueError, match=message):
        bench.bench_stream(None, progress=False, **kwargs)


def test_a_stream_must_fill_the_streaming_cache():
    """num_tokens <= sink_size + window_size never evicts: refused with the streaming arm only."""
    with pytest.raises(ValueError, match="must exceed the streaming cache"):
        bench.check_stream_args(1024)  # the default cache: 4 + 1020
    assert bench.check_stream_args(1025)["num_tokens"] == 1025
    assert bench.check_stream_args(100, methods=["dense"])["methods"] == ("dense",)
