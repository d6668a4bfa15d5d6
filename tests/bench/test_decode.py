"""The decode benchmark (streamingllm.bench.decode and .arms) on a tiny model; no timing is asserted."""

from __future__ import annotations

import math

import pytest
import torch

from streamingllm import SinkCache, bench, prefill
from streamingllm.bench.arms import Arm, Forward
from streamingllm.compat import new_dense_cache
from streamingllm.memory import storage_bytes, storage_layout
from streamingllm.report import write_csv
from tiny import VOCAB


def test_bench_decode_end_to_end_writes_csv_and_png(llama, tmp_path, read_csv, assert_png):
    seen = []
    rows = bench.bench_decode(llama, sizes=[8, 24], methods=["streaming", "dense", "recompute"], steps=5, warmup=1,
                              recompute_steps=2, block=2, progress=False, on_row=seen.append)
    assert [(r["size"], r["method"]) for r in rows] == [
        (n, m) for n in (8, 24) for m in ("streaming", "dense", "recompute")]
    assert seen == rows
    for r in rows:
        assert r["steps"] == (2 if r["method"] == "recompute" else 5)
        assert 0 < r["median_ms"] <= r["p90_ms"] and r["mean_ms"] > 0
        assert r["peak_mib"] > 0 and r["mem_source"] in ("cuda", "rss_hwm", "rss")
        by = {x["method"]: x for x in rows if x["size"] == r["size"]}
        assert r["vs_dense"] == pytest.approx(r["median_ms"] / by["dense"]["median_ms"])
        assert r["speedup_vs_recompute"] == pytest.approx(by["recompute"]["median_ms"] / r["median_ms"])
    state = {(r["size"], r["method"]): r["state_mib"] for r in rows}
    # dense: the storage of N + 1 tokens (a step's torch.cat, cropped back to N as a view), layers x K/V x fp32
    c = llama.config
    kv_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    assert state[(24, "dense")] * 2**20 == pytest.approx(kv_token * 25)
    assert state[(8, "recompute")] == 0 and state[(24, "streaming")] > 0

    header, table = read_csv(write_csv(rows, tmp_path / "out" / "decode.csv", bench.DECODE_COLUMNS))
    assert header == bench.DECODE_COLUMNS and len(table) == 6
    for line in table:
        for col in ("size", "steps", "median_ms", "p90_ms", "mean_ms", "state_mib", "peak_mib", "vs_dense",
                    "speedup_vs_recompute"):
            assert math.isfinite(float(line[col])), (col, line)
    assert_png(bench.plot_decode(rows, tmp_path / "out" / "decode.png", title="tiny"))
    text = bench.decode_table(rows).splitlines()
    assert "stream speed-up" in text[0] and "stream/dense" in text[0]
    assert len(text) == 5  # header, rule, 2 sizes, legend
    assert text[2].split()[0] == "8" and text[3].split()[0] == "24"


def test_bench_decode_subset_of_methods(llama):
    rows = bench.bench_decode(llama, sizes=[12], methods=["dense", "streaming"], steps=3, warmup=0, progress=False)
    assert [r["method"] for r in rows] == ["streaming", "dense"]
    assert all(r["speedup_vs_recompute"] is None for r in rows)
    rows = bench.bench_decode(llama, sizes=[12], methods=["recompute"], steps=8, recompute_steps=3, warmup=0,
                              recompute_logits="last", progress=False)
    assert [(r["method"], r["steps"]) for r in rows] == [("recompute", 3)]
    assert bench.decode_table(rows).splitlines()[0].split() == ["size", "recompute", "ms", "p90", "peak", "MiB"]


def test_arms_hold_n_tokens_and_recompute_covers_the_last_n(llama):
    """Each arm holds N tokens before a step; the recompute forward covers the last N, the new one
    included, with every token's logits by default (a plain forward, the paper's baseline)."""
    fwd, ids, tok = Forward(llama), torch.randint(0, VOCAB, (1, 30)), torch.tensor([[5]])
    for method in ("streaming", "streaming-compiled", "dense"):
        arm = Arm(method, fwd, 10, ids, sink_size=4, last_only=False)
        arm.step(tok)
        arm.after()
        arm.check_held()
    dense = Arm("dense", fwd, 10, ids, sink_size=4, last_only=False)
    dense.step(tok)
    with pytest.raises(RuntimeError, match="dense arm holds 11 tokens, expected 10"):
        dense.check_held()  # the crop in after() is what keeps it at N
    assert Arm("recompute", fwd, 10, ids, 4, last_only=False).window.step(tok).shape == (1, 10, VOCAB)
    last = Arm("recompute", fwd, 10, ids, 4, last_only=True).window.step(tok)
    plain = llama(input_ids=torch.cat([ids[:, -9:], tok], 1)).logits[:, -1]
    assert last.shape == (1, VOCAB) and torch.allclose(last, plain, atol=1e-5)


def test_compiled_arm_is_dropped_when_compilation_fails(llama, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed, dropping the streaming-compiled arm: "
                                            "RuntimeError: no C\\+\\+ compiler"):
        rows = bench.bench_decode(llama, sizes=[12, 20], methods=["streaming-compiled", "dense"], steps=2, warmup=0,
                                  progress=False)
    assert [(r["size"], r["method"]) for r in rows] == [(12, "dense"), (20, "dense")]
    with pytest.warns(RuntimeWarning, match="dropping"):  # every arm dropped: no rows, no error
        assert bench.bench_decode(llama, sizes=[12, 20], methods=["streaming-compiled"], steps=2, progress=False) == []


def test_storage_layout_detects_growth(llama):
    """The storage check can fail: a DynamicCache reallocates on every token; a SinkCache never."""
    fwd = Forward(llama)
    dense = new_dense_cache(llama)
    fwd.feed(dense, torch.randint(0, VOCAB, (1, 10)))
    before = storage_layout(dense)
    fwd(torch.tensor([[3]]), dense)
    assert storage_layout(dense) != before
    assert storage_bytes(dense) > sum(n for _, n in before)
    sink = SinkCache(llama, 4, 12)
    fwd.feed(sink, torch.randint(0, VOCAB, (1, 40)))
    before = storage_layout(sink)
    for t in range(30):
        fwd(torch.tensor([[t]]), sink)
    assert storage_layout(sink) == before


def test_forward_feeds_a_sink_cache_like_prefill(llama):
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(1))
    a, b = SinkCache(llama, 4, 28), SinkCache(llama, 4, 28)
    assert torch.allclose(Forward(llama).feed(a, ids[None], chunk_size=64), prefill(llama, b, ids, chunk_size=64),
                          atol=1e-5)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(sizes=[4, 64]), ValueError, "sizes must each be > the sink size"),
    (dict(sizes=[16], sink_size=16), ValueError, "sizes must each be > the sink size"),
    (dict(sizes=[]), ValueError, "sizes must list at least one"),
    (dict(sizes=[16, 16]), ValueError, "must not repeat"),
    (dict(sizes=[16.5]), TypeError, "sizes must be an integer"),
    (dict(sizes="16"), TypeError, "sizes must be a list of integers"),
    (dict(sizes=[16], steps=0), ValueError, "steps must be an integer >= 1"),
    (dict(sizes=[16], warmup=-1), ValueError, "warmup must be an integer >= 0"),
    (dict(sizes=[16], recompute_steps=0), ValueError, "recompute_steps must be an integer >= 1"),
    (dict(sizes=[16], block=0), ValueError, "block must be an integer >= 1"),
    (dict(sizes=[16], methods=["streaming", "beam"]), ValueError, "methods must be one of streaming, "),
    (dict(sizes=[16], methods=["dense", "dense"]), ValueError, "methods must not name a value twice"),
    (dict(sizes=[16], recompute_logits="some"), ValueError, "recompute_logits must be one of all, last"),
])
def test_bench_decode_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        bench.bench_decode(None, progress=False, **kwargs)  # rejected before the model is touched


def test_compiled_dense_arm_holds_n_tokens_and_decodes_like_dense(llama, compile_as_identity):
    """dense-compiled: a StaticCache of N + 1 slots whose new token's slot is given back after each
    step; with torch.compile as the identity, its logits are the DynamicCache arm's."""
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    fwd = Forward(llama)
    static, dense = Arm("dense-compiled", fwd, 10, ids, 4, last_only=False), Arm("dense", fwd, 10, ids, 4, False)
    for tok in (torch.tensor([[5]]), torch.tensor([[9]])):
        static.step(tok)
        static.after()
        static.check_held()
        want = fwd(tok, dense.state)
        dense.after()
        assert torch.allclose(compile_as_identity.outputs[-1].logits, want, atol=1e-5)


def test_variants_add_streaming_arms_and_every_row_has_its_bandwidth_limit(llama):
    from tiny import tiny_model

    bf16 = tiny_model("llama", dtype=torch.bfloat16)
    rows = bench.bench_decode(llama, sizes=[12], methods=["streaming", "dense"], steps=2, warmup=0, progress=False,
                              variants={"bfloat16": bf16})
    assert [r["method"] for r in rows] == ["streaming", "dense", "streaming@bfloat16"]
    assert all(r["limit_ms"] > 0 and r["vs_limit"] == pytest.approx(r["median_ms"] / r["limit_ms"]) for r in rows)
    assert rows[2]["limit_ms"] < rows[0]["limit_ms"]  # half the bytes to read
    assert "stream@bfloat16/dense" in bench.decode_table(rows).splitlines()[0]


def test_llama_cpp_arm_is_skipped_with_a_reason(llama):
    with pytest.warns(RuntimeWarning, match="skipping the llama.cpp arm: the model was not loaded from a GGUF file"):
        rows = bench.bench_decode(llama, sizes=[12], methods=["llama.cpp", "dense"], steps=2, warmup=0,
                                  progress=False)
    assert [r["method"] for r in rows] == ["dense"]


def test_roofline_counts_weights_and_kv_bytes(llama):
    from streamingllm.bench.roofline import copy_bandwidth, kv_bytes, limit_ms, weight_bytes

    params = sum(t.numel() * t.element_size() for t in (*llama.parameters(), *llama.buffers()))
    assert weight_bytes(llama) == params  # the rotary tables are buffers
    c = llama.config
    assert kv_bytes(llama, 10) == 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * 10
    bandwidth = copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, repeats=2)
    assert bandwidth > 1e8  # bytes/s
    assert limit_ms(llama, 10, 1e9) == pytest.approx(1000 * (params + kv_bytes(llama, 10)) / 1e9)


def test_the_dense_arm_gives_a_step_back_on_a_hybrid_model():
    """Gemma 3's sliding-window layers roll their window: the dense arm turns on transformers' past
    recording, so that after() gives back the step's token in every layer and each timed step sees
    the same cache (before the fix: a RuntimeError from crop)."""
    from tiny import tiny_model

    gemma3 = tiny_model("gemma3")
    fwd, ids, tok = Forward(gemma3), torch.randint(1, VOCAB, (1, 40)), torch.tensor([[5]])
    arm = Arm("dense", fwd, 30, ids, sink_size=4, last_only=False)
    before = [layer.keys.clone() for layer in arm.state.layers]
    arm.step(tok)
    arm.after()
    arm.check_held()
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, arm.state.layers))
    rows = bench.bench_decode(gemma3, sizes=[30], methods=["streaming", "dense"], steps=3, warmup=1, progress=False)
    assert [r["method"] for r in rows] == ["streaming", "dense"]
