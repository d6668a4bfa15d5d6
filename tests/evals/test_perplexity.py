"""Streaming perplexity: chunked equals token-by-token, every method equals a slow reference,
reports are well-formed, bad input gives clear errors."""

from __future__ import annotations

import csv
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamingllm.checks import ArgumentError
from streamingllm.evals.perplexity import (
    Scores,
    Setting,
    check_options,
    evaluate,
    make_settings,
    recompute_step,
    score_cached,
    score_dense,
    score_recompute,
    sink_tokens,
    summarize,
)
from streamingllm.evals.report import format_summary, plot_curves, plot_sweep, read_nll_csv, write_nll_csv
from tiny import VOCAB, tiny_model

TOL = 1e-4  # nats per token, float32


def text_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def full_forward_nll(model, ids: torch.Tensor) -> np.ndarray:
    """NLL of ids[1:] from one plain forward over the whole text (no cache): dense attention."""
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
    return F.cross_entropy(logits.double(), ids[1:], reduction="none").numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt_neox", "falcon", "bloom"])
@pytest.mark.parametrize("sink_size, window_size", [(0, 24), (4, 20)])
def test_chunked_equals_token_by_token(family, sink_size, window_size):
    model = tiny_model(family)
    ids = text_ids(130)
    setting = Setting("streaming", sink_size, window_size)
    chunked = score_cached(model, ids, setting, chunk_size=48)
    single = score_cached(model, ids, setting, chunk_size=1)
    assert np.array_equal(chunked.tokens, np.arange(1, 130)) and np.array_equal(single.tokens, chunked.tokens)
    assert np.abs(chunked.nll - single.nll).max() <= TOL


def test_chunked_with_sink_text_equals_token_by_token():
    model = tiny_model("llama")
    ids = text_ids(120)
    setting = Setting("streaming", 4, 20, sink_ids=(5, 5, 5, 5), sink_name='"5"')
    chunked, single = (score_cached(model, ids, setting, chunk_size=c) for c in (64, 1))
    assert len(chunked.nll) == 119 and np.abs(chunked.nll - single.nll).max() <= TOL
    plain = score_cached(model, ids, Setting("streaming", 4, 20), chunk_size=64)
    assert np.abs(plain.nll - chunked.nll).max() > 1e-3  # the sinks really were replaced


def test_streaming_equals_brute_force_on_one_layer_model():
    """With one layer a token's KV depends only on the token and its position, so StreamingLLM must
    equal running the model afresh on [sinks | last W tokens | current token] for every token."""
    model = tiny_model("llama", num_hidden_layers=1)
    ids, S, W = text_ids(90, seed=1), 4, 16
    got = score_cached(model, ids, Setting("streaming", S, W), chunk_size=32)
    want = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            q = t - 1  # the token whose output predicts token t
            ctx = ids[: q + 1] if q <= S + W else torch.cat((ids[:S], ids[q - W : q + 1]))
            want.append(F.cross_entropy(model(input_ids=ctx[None]).logits[0, -1:].double(), ids[t : t + 1]).item())
    assert np.abs(got.nll - np.array(want)).max() <= TOL


def test_dense_chunked_equals_token_by_token_and_full_forward():
    model = tiny_model("qwen2")
    ids = text_ids(100)
    chunked, single = score_dense(model, ids, chunk_size=32), score_dense(model, ids, chunk_size=1)
    assert np.abs(chunked.nll - single.nll).max() <= TOL
    assert np.abs(chunked.nll - full_forward_nll(model, ids)).max() <= TOL


@pytest.mark.parametrize("every, batch_tokens", [(1, 1), (3, 1), (1, 100), (3, 100)])
def test_recompute_equals_each_window_by_hand(every, batch_tokens):
    """One window per forward (batch_tokens=1) and 7 windows per forward (100 // 13) alike."""
    model = tiny_model("llama")
    ids, L = text_ids(60), 12
    got = score_recompute(model, ids, context=L, every=every, batch_tokens=batch_tokens)
    assert np.array_equal(got.tokens, np.arange(every, 60, every)) and got.every == every
    want = []
    with torch.no_grad():
        for t in got.tokens:
            window = ids[max(0, t - 1 - L) : t]  # L tokens before t - 1, and t - 1 itself
            want.append(F.cross_entropy(model(input_ids=window[None]).logits[0, -1:].double(), ids[t : t + 1]).item())
    assert np.abs(got.nll - np.array(want)).max() <= TOL


def test_sink_size_zero_equals_window():
    model = tiny_model("llama")
    ids = text_ids(100)
    settings = make_settings(["window", "streaming"], sink_size=[0], cache_size=[20])
    window, streaming = evaluate(model, ids, settings, chunk_size=32)
    assert window.setting.label == "window 0+20" and streaming.setting.label == "streaming 0+20"
    assert np.array_equal(window.nll, streaming.nll)


def test_methods_agree_before_the_cache_fills_and_differ_after():
    model = tiny_model("llama")
    ids, L = text_ids(80), 30
    results = evaluate(model, ids, make_settings(cache_size=[L]), chunk_size=16)
    by = {r.setting.method: r for r in results}
    early = slice(0, L)  # tokens 1..L: every method sees the whole prefix
    for m in ("window", "recompute", "streaming"):
        assert np.abs(by[m].nll[early] - by["dense"].nll[early]).max() <= TOL
    assert np.abs(by["window"].nll[L + 5 :] - by["dense"].nll[L + 5 :]).max() > 1e-3


def test_the_memory_method_scores_what_its_cache_gives():
    """``memory``: the same as streaming until something is evicted, then the NLL of its own cache
    fed in its lookup chunks; labelled with its blocks."""
    from streamingllm.cache import BlockMemory, MemoryCache
    from streamingllm.feed import prefill

    model = tiny_model("llama")
    ids, L = text_ids(120), 30
    memory = BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8)
    settings = make_settings(["streaming", "memory"], [4], cache_size=[L], memory=memory)
    assert [s.label for s in settings] == ["streaming 4+26", "memory 4+26 k2x8"]
    streaming, mem = evaluate(model, ids, settings, chunk_size=16)
    assert np.abs(mem.nll[: L - 1] - streaming.nll[: L - 1]).max() <= TOL
    assert np.abs(mem.nll[L + 10 :] - streaming.nll[L + 10 :]).max() > 1e-3
    logits = prefill(model, MemoryCache(model, 4, L - 4, memory), ids[None, :-1], chunk_size=8, return_all_logits=True)
    direct = torch.nn.functional.cross_entropy(logits[0].float(), ids[1:], reduction="none").double().numpy()
    assert np.abs(mem.nll - direct).max() <= TOL


def test_make_settings_expands_cache_sizes_and_windows():
    s = make_settings(["dense", "window", "recompute", "streaming"], sink_size=[0, 4], cache_size=[64, 128])
    assert [x.label for x in s] == [
        "dense", "window 0+64", "window 0+128", "recompute 64", "recompute 128",
        "streaming 0+64", "streaming 4+60", "streaming 0+128", "streaming 4+124",
    ]
    s = make_settings(["streaming"], sink_size=[4], window_size=[10, 20], sink_ids=[7], sink_name='"\\n"')
    assert [x.label for x in s] == ['streaming 4"\\n"+10', 'streaming 4"\\n"+20'] and s[0].sink_ids == (7, 7, 7, 7)


@pytest.mark.parametrize(
    "kwargs, param, message",
    [
        (dict(methods=["dense", "sliding"]), "methods",
         "methods must be one of dense, window, recompute, streaming, memory, got 'sliding'"),
        (dict(methods=[]), "methods", "methods must name at least one of"),
        (dict(methods=["dense", "dense"]), "methods", "methods must not name a value twice"),
        (dict(window_size=[0]), "window_size", "window_size must be an integer >= 1, got 0"),
        (dict(sink_size=[-1]), "sink_size", "sink_size must be an integer >= 0, got -1"),
        (dict(sink_size=[]), "sink_size", "sink_size must list at least one value"),
        (dict(sink_size=[0, 8], cache_size=[8]), "cache_size", "cache_size must be larger than the sink size 8"),
        (dict(window_size=[8], cache_size=[8]), "window_size", "window_size cannot be combined with a cache size"),
        (dict(sink_ids=[]), "sink_ids", "sink_ids must hold at least one token id"),
    ],
)
def test_bad_settings(kwargs, param, message):
    with pytest.raises(ArgumentError, match=message) as info:
        make_settings(**kwargs)
    assert info.value.param == param


def test_make_settings_takes_single_values_and_orders_methods():
    s = make_settings(["streaming", "window"], sink_size=4, cache_size=64)
    assert [x.label for x in s] == ["window 0+64", "streaming 4+60"]
    assert [x.label for x in make_settings(["dense"])] == ["dense"]
    assert make_settings(["window"])[0].cache_size == 1024


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(chunk_size=0), "chunk_size must be an integer >= 1, got 0"),
        (dict(recompute_every=0), "recompute_every must be 'auto' or an integer >= 1, got 0"),
        (dict(recompute_every="often"), "recompute_every must be 'auto' or an integer >= 1, got 'often'"),
        (dict(max_dense_tokens=1), "max_dense_tokens must be an integer >= 2, got 1"),
        (dict(segment_tokens=0), "segment_tokens must be an integer >= 1, got 0"),
        (dict(smooth=0), "smooth must be an integer >= 1, got 0"),
        (dict(sink_text=""), "sink_text must be the text whose tokens become the sinks"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ArgumentError, match=message) as info:
        check_options(**kwargs)
    assert info.value.param == next(iter(kwargs))


def test_good_options_and_recompute_step():
    check_options(chunk_size=1, recompute_every="auto", max_dense_tokens=None, segment_tokens=None, smooth=1)
    check_options(recompute_every=3, max_dense_tokens=2, segment_tokens=1, sink_text="\n")
    assert recompute_step(1001, "auto") == 4 and recompute_step(100, "auto") == 1 and recompute_step(100, 7) == 7
    with pytest.raises(ArgumentError, match="recompute_every"):
        recompute_step(100, "sometimes")


def test_evaluate_auto_recompute_step():
    model = tiny_model("llama")
    (rec,) = evaluate(model, text_ids(40), make_settings(["recompute"], cache_size=[8]), recompute_every="auto")
    assert rec.every == 1 and np.array_equal(rec.tokens, np.arange(1, 40))


def test_cache_beyond_trained_length_warns_once():
    model = tiny_model("llama", max_position_embeddings=32)
    settings = make_settings(["window", "recompute", "streaming"], sink_size=[4], cache_size=[16, 31, 32, 48])
    with pytest.warns(UserWarning) as caught:
        evaluate(model, text_ids(50), settings, chunk_size=32, recompute_every=10)
    messages = [str(w.message) for w in caught]
    assert messages == ["cache sizes 32, 48 reach the model's trained length 32: positions from 32 on were never trained"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 31 tokens held: the next token sits at position 31, the last trained one
        evaluate(model, text_ids(50), make_settings(["streaming", "dense"], cache_size=[31]), chunk_size=32)


def test_sink_tokens():
    class Chars:
        def __call__(self, text, add_special_tokens=True):
            return SimpleNamespace(input_ids=[ord(c) for c in text])

    assert sink_tokens(Chars(), "\n\t") == ([10, 9], '"\\n\\t"')
    with pytest.raises(ArgumentError, match="sink_text must give at least one token"):
        sink_tokens(Chars(), "")


def test_alibi_table_too_small_is_refused_before_any_work():
    model = tiny_model("mpt")  # max_seq_len 4096 in tiny.py
    model.config.max_seq_len = 32
    with pytest.raises(ValueError, match="ALiBi"):
        evaluate(model, text_ids(50), make_settings(["dense", "streaming"], cache_size=[40]))


def test_short_text_and_dense_limit_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="need at least 2"):
        evaluate(model, text_ids(1), make_settings(["streaming"], cache_size=[8]))
    with pytest.raises(ArgumentError, match="max_dense_tokens is below the text's 50 tokens"):
        evaluate(model, text_ids(50), make_settings(["dense"]), max_dense_tokens=40)


def test_reports_are_well_formed(tmp_path):
    model = tiny_model("llama")
    ids = text_ids(120)
    settings = make_settings(sink_size=[0, 4], cache_size=[16, 32])
    results = evaluate(model, ids, settings, chunk_size=32, recompute_every=5)
    write_nll_csv(results, tmp_path / "nll.csv")
    with open(tmp_path / "nll.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"label", "method", "sink_size", "window_size", "token", "nll"}
    expected = sum(len(r.nll) for r in results)
    assert len(rows) == expected
    # the dense rows hold each token's NLL under the model: -log softmax(logits of the token before)[token],
    # written out by hand here (no cross_entropy), token index by token index
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].double()
    by_hand = torch.logsumexp(logits, -1) - logits[torch.arange(len(ids) - 1), ids[1:]]
    dense_rows = {int(r["token"]): float(r["nll"]) for r in rows if r["label"] == "dense"}
    assert sorted(dense_rows) == list(range(1, len(ids)))
    assert max(abs(dense_rows[t] - by_hand[t - 1].item()) for t in dense_rows) <= TOL
    back = read_nll_csv(tmp_path / "nll.csv")
    assert [b.setting.label for b in back] == [r.setting.label for r in results]
    for b, r in zip(back, results):
        assert np.array_equal(b.tokens, r.tokens) and b.every == r.every
        assert np.abs(b.nll - r.nll).max() < 1e-5
    summary = summarize(results, len(ids), segment_tokens=40)
    assert [seg for seg in summary.segments] == [(0, 40), (40, 80), (80, 120)]
    dense = summary.rows[0]
    assert dense["label"] == "dense" and dense["ppl"] == pytest.approx(np.exp(results[0].nll.mean()))
    assert dense["0-40"] == pytest.approx(np.exp(results[0].nll[:39].mean()))  # tokens 1..39
    rec = next(r for r in results if r.setting.method == "recompute")
    assert dense["@recompute"] == pytest.approx(np.exp(results[0].nll[rec.tokens - 1].mean()))
    table = format_summary(summary)
    assert "streaming 4+28" in table and "every 5th token" in table
    for name, plot in (("curves.png", plot_curves), ("sweep.png", plot_sweep)):
        plot(results, tmp_path / name)
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_no_sweep_plot_without_a_sweep(tmp_path):
    r = Scores(Setting("streaming", 4, 16), np.arange(1, 5), np.ones(4))
    assert plot_sweep([r], tmp_path / "sweep.png") is False and not (tmp_path / "sweep.png").exists()


