"""transformers' generate() with a SinkCache: multi-turn after eviction, greedy and sampled, against
the slow reference fed the same tokens one by one; and the library's exact-prefill entry point."""

from __future__ import annotations

import pytest
import torch

import streamingllm
from reference import ReferenceSinkCache
from streamingllm import ApproximateChunkError, SinkCache, UnsupportedModelError
from tiny import FAMILIES, VOCAB, tiny_model

TOL = 1e-4
S, W = 4, 28
INTERFACE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox", "sink_llama-learned"]  # attention interface
OWN_ATTENTION = ["falcon", "mpt", "bloom"]  # attention code of their own: no band inside model.generate


def _model(family):
    model = tiny_model(family)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def _reference_logits(model, stream):
    """Logits (T, vocab) of the reference cache fed ``stream`` (1, T) one token at a time."""
    cache = ReferenceSinkCache(model, S, W)
    with torch.no_grad():
        return torch.cat([model(stream[:, t : t + 1], cache=cache).logits[0] for t in range(stream.shape[1])])


def _turns(generate, model, lengths=(30, 10, 7), new=40, **kwargs):
    """Run a conversation: each turn appends a user message to everything so far and generates.
    Returns the final token stream and, per turn, (index of its first generated token, its logits)."""
    g = torch.Generator().manual_seed(0)
    cache, seq, turns = SinkCache(model, S, W), None, []
    for n in lengths:
        prompt = torch.randint(1, VOCAB, (1, n), generator=g)
        seq = prompt if seq is None else torch.cat([seq, prompt], 1)
        out = generate(model, seq, cache, attention_mask=torch.ones_like(seq), max_new_tokens=new, use_cache=True,
                       pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kwargs)
        turns.append((seq.shape[1], torch.cat(out.logits)))
        seq = out.sequences
    return seq, turns


def _model_generate(model, seq, cache, **kwargs):
    return model.generate(seq, cache=cache, **kwargs)


def _assert_turns_match_reference(model, seq, turns):
    ref = _reference_logits(model, seq)
    for first, logits in turns:
        assert (logits - ref[first - 1 : first - 1 + len(logits)]).abs().max().item() <= TOL


@pytest.mark.parametrize("family", INTERFACE_FAMILIES)
def test_multi_turn_model_generate_after_eviction_is_exact(family):
    """The standard transformers conversation pattern: the whole conversation so far + the same cache.
    Each new turn overflows the full cache; it is served with its exact band."""
    model = _model(family)
    seq, turns = _turns(_model_generate, model, do_sample=False)
    assert seq.shape[1] == 30 + 10 + 7 + 3 * 40
    _assert_turns_match_reference(model, seq, turns)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_multi_turn_sampling_is_exact(family):
    model = _model(family)
    torch.manual_seed(1)
    seq, turns = _turns(_model_generate, model, do_sample=True, top_k=0, temperature=1.0)
    _assert_turns_match_reference(model, seq, turns)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "falcon-alibi"])
def test_library_generate_prefills_long_prompts_exactly(family):
    """streamingllm.generate: a first prompt far longer than the cache, then more turns, every family."""
    model = _model(family)
    seq, turns = _turns(streamingllm.generate, model, lengths=(90, 12), new=20, do_sample=False)
    _assert_turns_match_reference(model, seq, turns)


@pytest.mark.parametrize("family", OWN_ATTENTION + ["falcon-alibi"])
def test_model_generate_refuses_what_it_cannot_do_exactly(family):
    """Families whose attention bypasses transformers' interface get no band: an overflowing turn is
    refused with an error naming the exact way (not computed wrongly)."""
    model = _model(family)
    cache = SinkCache(model, S, W)
    seq = torch.randint(1, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    seq = model.generate(seq, cache=cache, max_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
    seq = torch.cat([seq, torch.randint(1, VOCAB, (1, 5))], 1)
    with pytest.raises(ApproximateChunkError, match="streamingllm.generate"):
        model.generate(seq, cache=cache, max_new_tokens=2, do_sample=False, use_cache=True, pad_token_id=0)


def test_falcon_alibi_cannot_continue_through_generate_after_eviction():
    model = _model("falcon-alibi")
    seq = torch.randint(1, VOCAB, (1, 60), generator=torch.Generator().manual_seed(3))
    with pytest.raises(UnsupportedModelError, match="generate_tokens"):
        streamingllm.generate(model, seq, SinkCache(model, S, W), max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "phi3"])
def test_a_long_first_prompt_through_model_generate_is_exact(family):
    """A 90-token prompt into a 4+28 cache in one forward: served with its band (the new sinks
    are stored first and seen through their copies), equal to streaming it token by token."""
    model = _model(family)
    seq, turns = _turns(_model_generate, model, lengths=(90, 8), new=20, do_sample=False)
    _assert_turns_match_reference(model, seq, turns)


@pytest.mark.parametrize("family", OWN_ATTENTION)
def test_a_long_first_prompt_without_a_band_is_refused_not_approximated(family):
    model = _model(family)
    seq = torch.randint(1, VOCAB, (1, 60), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=2, do_sample=False, use_cache=True, pad_token_id=0)
    with pytest.raises(ApproximateChunkError, match="streamingllm.generate"):
        model.generate(seq, cache=SinkCache(model, S, W), **kw)
    fast = SinkCache(model, S, W, fast_chunks=True)  # the explicit opt-in
    assert model.generate(seq, cache=fast, **kw).shape[1] == 62


def test_the_band_is_what_makes_turns_exact():
    """Negative control: the same conversation with the approximation allowed differs from the reference."""
    model = _model("llama")

    def fast_generate(model, seq, cache, **kwargs):
        cache.timeline.fast_chunks = True
        return model.generate(seq, cache=cache, **kwargs)

    seq, turns = _turns(fast_generate, model, do_sample=False)
    ref = _reference_logits(model, seq)
    first, logits = turns[1]
    assert (logits - ref[first - 1 : first - 1 + len(logits)]).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementations_are_exact(implementation):
    """The cache switches the model to the sink-aware variant of its own implementation."""
    model = _model("llama")
    model.set_attn_implementation(implementation)
    seq, turns = _turns(_model_generate, model, lengths=(30, 10), new=30, do_sample=False)
    assert model.config._attn_implementation == f"streamingllm_{implementation}"
    _assert_turns_match_reference(model, seq, turns)


def test_flex_attention_streams_exactly_one_token_at_a_time():
    """flex_attention takes no additive float mask (on CPU a float mask crashes the process), so it
    gets no band: exact feeding goes token by token, and model.generate refuses overflowing turns."""
    model = _model("llama")
    model.set_attn_implementation("flex_attention")
    cache = SinkCache(model, S, W)
    assert not cache.exact_chunks and model.config._attn_implementation == "flex_attention"
    ids = torch.randint(1, VOCAB, (1, 50), generator=torch.Generator().manual_seed(5))
    logits = streamingllm.prefill(model, cache, ids, chunk_size=16, return_all_logits=True)[0]
    assert (logits - _reference_logits(model, ids)).abs().max().item() <= TOL
    with pytest.raises(ApproximateChunkError):
        model.generate(torch.cat([ids, ids[:, :5]], 1), cache=cache, max_new_tokens=1, do_sample=False)


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "paged|flash_attention_2"])
def test_flash_attention_is_refused_before_any_work(implementation):
    from tiny import tiny_config

    config = tiny_config("llama")
    config._attn_implementation = implementation
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        SinkCache(config, S, W)


def _left_padded(rows):
    longest = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - r.shape[1] :], mask[i, longest - r.shape[1] :] = r[0], 1
    return ids, mask


@pytest.mark.parametrize("family, generate", [("llama", _model_generate), ("qwen3", _model_generate),
                                              ("gemma", streamingllm.generate)])
def test_left_padded_batches_stream_each_row_as_alone(family, generate):
    """Rows of 30, 20 and 9 tokens, left-padded, two turns of generate() past eviction: each row's
    logits equal its own single stream's, and so do the reference's."""
    model = _model(family)
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(1, VOCAB, (1, n), generator=g) for n in (30, 20, 9)]
    ids, mask = _left_padded(rows)
    cache = SinkCache(model, S, W)
    kw = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    first = generate(model, ids, cache, attention_mask=mask, max_new_tokens=40, **kw)
    more = torch.randint(1, VOCAB, (3, 6), generator=g)  # every conversation adds a 6-token turn
    seq = torch.cat([first.sequences, more], 1)
    second = generate(model, seq, cache, attention_mask=torch.cat([mask, torch.ones(3, seq.shape[1] - mask.shape[1],
                      dtype=torch.long)], 1), max_new_tokens=20, **kw)
    assert len(cache.row_caches) == 3 and cache.cached_tokens == S + W
    with pytest.raises(ValueError, match="rows"):
        cache.exact_chunk_mask(8)  # the rows plan their own chunks
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([0, 1, 2]))
    logits = torch.cat([torch.stack(first.logits, 1), torch.stack(second.logits, 1)], 1)
    for r, row in enumerate(rows):
        stream = torch.cat([row, first.sequences[r : r + 1, ids.shape[1] :], more[r : r + 1],
                            second.sequences[r : r + 1, seq.shape[1] :]], 1)
        ref = _reference_logits(model, stream)
        n = row.shape[1]
        expected = torch.cat([ref[n - 1 : n - 1 + 40], ref[n + 40 + 6 - 1 : n + 40 + 6 - 1 + 20]])
        assert (logits[r] - expected).abs().max().item() <= TOL
