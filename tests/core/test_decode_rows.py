"""Batched decode of independent streams (what the server does for its sessions): every row of
``decode_rows`` equals its own stream fed alone through the slow reference cache."""

from __future__ import annotations

import pytest
import torch

from reference import ReferenceSinkCache
from streamingllm import SinkCache
from streamingllm.feed import decode_rows, prefill, token_logprobs
from tiny import FAMILIES, HYBRID_FAMILIES, VOCAB, tiny_model

TOL = 1e-4
SIZES = [(4, 28), (9, 20), (0, 16)]  # sinks and windows differ per stream (a pinned system prompt, a plain window)
PROMPTS = [30, 7, 19]  # and so do lengths: one evicting, one far from full


def _reference_logits(model, stream, sink_size, window_size):
    cache = ReferenceSinkCache(model, sink_size, window_size)
    with torch.no_grad():
        return torch.cat([model(stream[:, t : t + 1], cache=cache).logits[0] for t in range(stream.shape[1])])


@pytest.mark.filterwarnings("ignore::streamingllm.cache.NativeWindowWarning")  # mistral-sliding: sizes past its window
@pytest.mark.parametrize("family", FAMILIES + HYBRID_FAMILIES)
def test_each_row_streams_as_if_alone(family, monkeypatch):
    model = tiny_model(family)
    stacked = []
    original = SinkCache.stacked.__func__
    monkeypatch.setattr(SinkCache, "stacked", classmethod(lambda cls, caches: stacked.append(len(caches))
                                                          or original(cls, caches)))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (1, n), generator=g) for n in PROMPTS]
    caches = [SinkCache(model, s, w) for s, w in SIZES]
    logits = torch.cat([prefill(model, c, p, chunk_size=8) for c, p in zip(caches, prompts)])
    streams, seen = [p[0].tolist() for p in prompts], [[] for _ in prompts]
    for _ in range(50):  # past every window: each row evicts on its own schedule
        tokens = logits.argmax(-1)
        for r, t in enumerate(tokens.tolist()):
            streams[r].append(t)
        for r in range(len(caches)):
            seen[r].append(logits[r])
        logits = decode_rows(model, caches, tokens)
    for r, ((s, w), n) in enumerate(zip(SIZES, PROMPTS)):
        ref = _reference_logits(model, torch.tensor([streams[r]]), s, w)
        got = torch.stack(seen[r])
        assert (got - ref[n - 1 : n - 1 + len(got)]).abs().max().item() <= TOL, f"row {r}"
        assert caches[r].seen_tokens == n + 50 and caches[r].cached_tokens == min(n + 50, caches[r].max_cached_tokens)
    if caches[0].can_stack:  # the families behind transformers' attention interface share one forward
        assert stacked == [3] * 50
    else:
        assert not stacked


def test_rows_that_cannot_share_a_forward_are_refused_by_stacked():
    model = tiny_model("llama")
    cache = SinkCache(model, 4, 28)
    prefill(model, cache, torch.randint(1, VOCAB, (2, 5)))  # a batch of two: not one stream
    assert not cache.can_stack
    with pytest.raises(ValueError, match="same model"):
        SinkCache.stacked([cache])
    with pytest.raises(ValueError, match="one token per cache"):
        decode_rows(model, [SinkCache(model, 4, 28)], [1, 2])


def test_token_logprobs_are_those_of_the_softmax():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    chosen, top = token_logprobs(logits, 2, top=2)
    logp = torch.log_softmax(logits, -1)
    assert chosen == pytest.approx(float(logp[2]))
    assert [t for t, _ in top] == [1, 2] and top[0][1] == pytest.approx(float(logp[1]))
    assert token_logprobs(logits, 0)[1] == []
