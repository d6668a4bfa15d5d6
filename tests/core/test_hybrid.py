"""Hybrid local/global models (Gemma 2, Gemma 3, gpt-oss, Mistral with a sliding window): global
layers keep sinks + window, sliding layers their own window in the same position frame.

The fast cache against the slow reference extended the same way (tests/reference.py), against
transformers' own DynamicCache while nothing global is evicted, and against itself (chunks,
prepared steps, saved states, padded batches); with negative controls that fail when the sliding
layers are given sinks or the wrong position frame.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from transformers import DynamicCache

from reference import ReferenceSinkCache
from streamingllm import SinkCache
from streamingllm.cache import NativeWindowWarning
from streamingllm.families import FULL, SLIDING, layer_types_of, family_of, rope_inv_freq
from streamingllm.feed import prefill
from streamingllm.timeline import Timeline
from tiny import HYBRID_FAMILIES, SLIDING_WINDOW, VOCAB, tiny_config, tiny_model

TOL = 1e-4
MIXED = ["gemma2", "gemma3", "gpt_oss"]  # global and sliding layers
#: S + W below the native window (12), just below it, and above it
SIZES = [(2, 6), (4, 7), (4, 16), (0, 9)]


def _decode(model, cache, ids, masks=None):
    """Token by token; the fast cache gets the library's position ids (rebased), the reference none."""
    out = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            kw = {} if masks is None else {"attention_mask": dict(masks)}
            if isinstance(cache, SinkCache):
                kw["position_ids"] = cache.position_ids(1)
            out.append(model(ids[:, t : t + 1], cache=cache, **kw).logits)
    return torch.cat(out, dim=1)


def _native_warning(family, sink_size, window_size):
    """Expect the warning that an all-sliding model keeps its own window (sinks unused), where it applies."""
    applies = family == "mistral-sliding" and sink_size and sink_size + window_size >= SLIDING_WINDOW
    return pytest.warns(NativeWindowWarning) if applies else nullcontext()


def _ids(n, seed, batch=1):
    """Random token ids, none of them 0 (the pad id generate() is given)."""
    return torch.randint(1, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
@pytest.mark.parametrize("sink_size, window_size", SIZES)
def test_matches_the_extended_reference_over_a_long_decode(family, sink_size, window_size):
    model = tiny_model(family)
    ids = _ids(200, 1)
    with _native_warning(family, sink_size, window_size):
        fast = SinkCache(model, sink_size, window_size, rebase_every=7)  # rebases every few tokens
    a = _decode(model, fast, ids)
    b = _decode(model, ReferenceSinkCache(model, sink_size, window_size), ids)
    assert (a - b).abs().max().item() <= TOL
    assert fast.seen_tokens == 200 and fast.cached_tokens == fast.max_cached_tokens


@pytest.mark.parametrize("sink_size, window_size", [(4, 60), (4, 200)])
def test_gpt_oss_with_its_own_128_token_window(sink_size, window_size):
    """gpt-oss as released: 128-token sliding layers and learned sink logits; a global cache below and
    above that window, decoded token by token and fed in exact chunks."""
    model = tiny_model("gpt_oss", sliding_window=128)
    ids = _ids(420, 18)
    fast = SinkCache(model, sink_size, window_size, rebase_every=50)
    assert fast.native_window(0) == 128 and fast.native_window(1) is None
    a = _decode(model, fast, ids)
    b = _decode(model, ReferenceSinkCache(model, sink_size, window_size), ids)
    c = prefill(model, SinkCache(model, sink_size, window_size), ids, chunk_size=150, return_all_logits=True)
    assert (a - b).abs().max().item() <= TOL and (c - b).abs().max().item() <= TOL


@pytest.mark.parametrize("family", MIXED)
def test_the_policies_follow_the_layer_types(family):
    config = tiny_config(family)
    cache = SinkCache(config, 4, 16)
    assert layer_types_of(config, family_of(config)) == [SLIDING, FULL, SLIDING]
    assert cache.layer_policies == ["sliding", "global", "sliding"] and cache.is_sliding == [True, False, True]
    assert [cache.native_window(i) for i in range(3)] == [SLIDING_WINDOW, None, SLIDING_WINDOW]
    assert cache.max_cached_tokens == 20


@pytest.mark.parametrize("family", MIXED)
def test_the_mask_sizes_agree_within_each_layer_type(family):
    """transformers sizes one mask per layer type from the first layer of that type: every layer of
    a type must report the same query offset and key count (what it holds, plus the new tokens)."""
    model = tiny_model(family)
    cache = SinkCache(model, 4, 16)
    for fed, (full_held, sliding_held) in ((5, (5, 5)), (14, (19, 11)), (30, (20, 11))):
        prefill(model, cache, _ids(fed, 15), chunk_size=7)
        sizes = [(cache.get_query_offset(i), cache.get_mask_sizes(3, i)) for i in range(3)]
        assert sizes[0] == sizes[2] == (sliding_held, (sliding_held + 3, 0))
        assert sizes[1] == (full_held, (full_held + 3, 0))


def test_a_model_whose_layers_all_slide():
    """Mistral with sliding_window: a cache smaller than the window streams with sinks in every
    layer; one that does not fit inside it keeps the model's own window (and says sinks go unused)."""
    config = tiny_config("mistral-sliding")
    assert SinkCache(config, 4, 7).layer_policies == ["global", "global"]
    with pytest.warns(NativeWindowWarning, match="sink_size \\+ window_size < 12"):
        cache = SinkCache(config, 4, 8)
    assert cache.layer_policies == ["sliding", "sliding"] and cache.max_cached_tokens == SLIDING_WINDOW - 1


@pytest.mark.parametrize("family", MIXED)
def test_equals_dynamic_cache_while_no_global_token_is_evicted(family):
    """transformers' own cache keeps the same sliding windows (DynamicSlidingWindowLayer): with room
    for the whole stream in the global layers, the two agree far past the sliding window."""
    model = tiny_model(family)
    ids = _ids(90, 2, batch=2)
    a = prefill(model, SinkCache(model, 4, 100), ids, chunk_size=1, return_all_logits=True)
    b = prefill(model, SinkCache(model, 4, 100), ids, chunk_size=17, return_all_logits=True)
    with torch.no_grad():
        dense = DynamicCache(config=model.config)
        c = torch.cat([model(ids[:, t : t + 1], cache=dense).logits for t in range(ids.shape[1])], dim=1)
    assert (a - c).abs().max().item() <= TOL and (b - c).abs().max().item() <= TOL


@pytest.mark.parametrize("family", MIXED)
def test_each_layer_type_rotates_with_its_own_frequencies(family):
    model = tiny_model(family)
    cache = SinkCache(model, 4, 16)
    for group in cache.groups:
        expected = rope_inv_freq(model.config, group.layer_type)
        assert torch.allclose(group.rotator.inv_freq64.float(), expected, rtol=1e-6)
    full, sliding = (rope_inv_freq(model, t) for t in (FULL, SLIDING))
    assert torch.equal(full, sliding) == (family != "gemma3")  # Gemma 3: base 1e6 (scaled by 8) vs 1e4


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
@pytest.mark.parametrize("sink_size, window_size, chunk", [(2, 6, 5), (4, 16, 13), (4, 16, 40), (0, 9, 25)])
def test_exact_chunks_equal_token_by_token(family, sink_size, window_size, chunk):
    """Chunks that overflow the global window (given their band), the sliding one (banded by the
    model's own mask), or both; then single tokens (the ring) and chunks again."""
    model = tiny_model(family)
    ids = _ids(150, 3, batch=2)
    with _native_warning(family, sink_size, window_size):
        one, many = SinkCache(model, sink_size, window_size), SinkCache(model, sink_size, window_size)
    a = prefill(model, one, ids, chunk_size=1, return_all_logits=True)
    b = torch.cat([prefill(model, many, ids[:, :100], chunk_size=chunk, return_all_logits=True),
                   prefill(model, many, ids[:, 100:130], chunk_size=1, return_all_logits=True),
                   prefill(model, many, ids[:, 130:], chunk_size=chunk, return_all_logits=True)], dim=1)
    assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("family", MIXED)
def test_generate_with_a_long_prompt_and_a_second_turn(family):
    """model.generate: a prompt overflowing both windows (the global band comes from the sink-aware
    attention, the sliding one from the model's mask), then the whole conversation again."""
    model = tiny_model(family)
    prompt = _ids(40, 4)
    cache = SinkCache(model, 4, 16)
    out = model.generate(prompt, cache=cache, max_new_tokens=30, do_sample=False, pad_token_id=0)
    turn = torch.cat([out, _ids(25, 5)], dim=1)
    out2 = model.generate(turn, cache=cache, max_new_tokens=20, do_sample=False, pad_token_id=0)
    ref = ReferenceSinkCache(model, 4, 16)
    logits = _decode(model, ref, out2[:, :-1])
    predicted = logits[0].argmax(-1)  # logits at t predict token t + 1
    assert out2[0, : turn.shape[1]].tolist() == turn[0].tolist()
    assert predicted[39:69].tolist() == out2[0, 40:70].tolist()  # the first answer
    assert predicted[94:114].tolist() == out2[0, 95:115].tolist()  # the second


@pytest.mark.parametrize("family", MIXED + ["mistral-sliding"])
def test_prepared_decode_steps_equal_ordinary_steps(family):
    model = tiny_model(family)
    ids = _ids(120, 6)
    with _native_warning(family, 4, 20):
        plain, prepared = SinkCache(model, 4, 20, rebase_every=9), SinkCache(model, 4, 20, rebase_every=9)
    a = _decode(model, plain, ids)
    out = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            pos = prepared.prepare_decode_step()
            pos = prepared.position_ids(1) if pos is None else pos
            out.append(model(ids[:, t : t + 1], cache=prepared, position_ids=pos).logits)
    assert (a - torch.cat(out, dim=1)).abs().max().item() <= TOL
    assert prepared.prepare_decode_step() is not None  # both groups full: every step was prepared


@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])
def test_a_saved_hybrid_cache_continues_exactly(family, tmp_path):
    model = tiny_model(family)
    ids = _ids(100, 7)
    original = SinkCache(model, 2, 6, rebase_every=9)
    prefill(model, original, ids[:, :61], chunk_size=1)
    torch.save(original.state_dict(), tmp_path / "cache.pt")
    restored = SinkCache(model, 2, 6, rebase_every=9)
    restored.load_state_dict(torch.load(tmp_path / "cache.pt", weights_only=True))
    a = prefill(model, original, ids[:, 61:], chunk_size=1, return_all_logits=True)
    b = prefill(model, restored, ids[:, 61:], chunk_size=1, return_all_logits=True)
    assert (a - b).abs().max().item() == 0


@pytest.mark.parametrize("family", MIXED)
def test_a_left_padded_batch_streams_each_row_as_alone(family):
    model = tiny_model(family)
    long, short = _ids(50, 8)[0], _ids(33, 9)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(17, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :17] = 0
    cache = SinkCache(model, 2, 6)
    out = model.generate(batch, attention_mask=mask, cache=cache, max_new_tokens=15, do_sample=False, pad_token_id=0)
    for row, ids in enumerate((long, short)):
        alone = model.generate(ids[None], cache=SinkCache(model, 2, 6), max_new_tokens=15, do_sample=False,
                               pad_token_id=0)
        assert out[row, 50:].tolist() == alone[0, ids.numel() :].tolist()


def test_storage_is_flat_per_layer_type():
    model = tiny_model("gemma3")
    cache = SinkCache(model, 2, 6)
    sizes = []
    for piece in _ids(160, 10).split(40, dim=1):
        prefill(model, cache, piece, chunk_size=7)
        sizes.append(sum(t.numel() for t in cache.tensors()))
    assert len(set(sizes)) == 1
    assert [layer.keys.shape[-2] for layer in cache.layers] == [SLIDING_WINDOW, 2 + 6 + 1, SLIDING_WINDOW]


# --- negative controls: the checks above fail for a cache that gives the sliding layers sinks or
# the wrong position frame. With single tokens, every held key is visible to the query in every layer
# type, so the model's masks are dropped here (as a cache that returned them unmasked would have it).
UNMASKED = {FULL: None, SLIDING: None}


@pytest.mark.parametrize("family", MIXED)
@pytest.mark.parametrize("sink_size, window_size", [(2, 6), (4, 16)])
def test_the_reference_tells_the_sliding_policy_apart(family, sink_size, window_size):
    model = tiny_model(family)
    ids = _ids(80, 11)
    fast = _decode(model, SinkCache(model, sink_size, window_size, rebase_every=7), ids, UNMASKED)
    ref = {v: _decode(model, ReferenceSinkCache(model, sink_size, window_size, sliding=v), ids, UNMASKED)
           for v in ("native", "sinks", "in_cache_frame")}
    assert (fast - ref["native"]).abs().max().item() <= TOL
    assert (fast - ref["sinks"]).abs().max().item() > 100 * TOL
    assert (fast - ref["in_cache_frame"]).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("family", MIXED)
def test_a_cache_giving_the_sliding_layers_sinks_fails(family, monkeypatch):
    import streamingllm.cache.groups as cache_module  # where the groups are built

    model = tiny_model(family)
    ids = _ids(60, 12)
    monkeypatch.setattr(cache_module, "layer_policies", lambda config, *a: ["global"] * config.num_hidden_layers)
    broken = _decode(model, SinkCache(model, 2, 6), ids)
    assert (broken - _decode(model, ReferenceSinkCache(model, 2, 6), ids)).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("family", MIXED)
def test_a_cache_whose_sliding_layers_miss_a_rebase_fails(family, monkeypatch):
    """The sliding layers' keys not moved with the frame when the positions are rebased."""
    model = tiny_model(family)
    ids = _ids(60, 13)
    plan = Timeline.plan

    def stale(self, q, p0, *rest):
        step = plan(self, q, p0, *rest)
        return step if not self.masks_itself else type(step)(**{**step.__dict__, "shift": 0})

    monkeypatch.setattr(Timeline, "plan", stale)
    broken = _decode(model, SinkCache(model, 2, 6, rebase_every=7), ids)
    assert (broken - _decode(model, ReferenceSinkCache(model, 2, 6), ids)).abs().max().item() > 100 * TOL


def test_a_cache_rotating_sliding_keys_with_the_global_base_fails(monkeypatch):
    """Gemma 3's sliding layers rotated with the global layers' RoPE (base 1e6, scaled): a wrong frame."""
    import streamingllm.cache.groups as cache_module  # where the groups are built

    model = tiny_model("gemma3")
    ids = _ids(60, 14)
    original = cache_module.rope_inv_freq
    monkeypatch.setattr(cache_module, "rope_inv_freq", lambda m, layer_type=None: original(m, FULL))
    broken = _decode(model, SinkCache(model, 2, 6, rebase_every=7), ids)
    assert (broken - _decode(model, ReferenceSinkCache(model, 2, 6), ids)).abs().max().item() > 100 * TOL


@pytest.mark.filterwarnings("ignore::streamingllm.cache.NativeWindowWarning")
def test_stacked_streams_of_one_all_sliding_model_may_keep_different_policies():
    """A server's sessions of one Mistral-style model: a cache below the window streams with sinks,
    one above it keeps the model's window; stacked in one forward, each row still streams as alone.
    (Single tokens see every held key whatever the window, so this checks the policies, not the
    rows' sliding masks: the left-padded batch test above, with chunks, checks those.)"""
    from streamingllm.feed import decode_rows

    model = tiny_model("mistral-sliding")
    sizes, prompts = [(2, 6), (4, 28)], [_ids(9, 16), _ids(20, 17)]
    caches = [SinkCache(model, s, w) for s, w in sizes]
    assert [c.layer_policies[0] for c in caches] == ["global", "sliding"]
    logits = torch.cat([prefill(model, c, p, chunk_size=8) for c, p in zip(caches, prompts)])
    streams, seen = [p[0].tolist() for p in prompts], [[], []]
    for _ in range(30):
        tokens = logits.argmax(-1)
        for r, t in enumerate(tokens.tolist()):
            streams[r].append(t)
            seen[r].append(logits[r])
        logits = decode_rows(model, caches, tokens)
    for r, ((s, w), p) in enumerate(zip(sizes, prompts)):
        ref = _decode(model, ReferenceSinkCache(model, s, w), torch.tensor([streams[r]]))[0]
        n = p.shape[1]
        assert (torch.stack(seen[r]) - ref[n - 1 : n - 1 + 30]).abs().max().item() <= TOL
