"""The memory of evicted blocks (MemoryCache): the fast path against the float64 reference written from
the definition (tests/memory_reference.py), the lookup, bounded accelerator memory, spilling, saved
states, and the loops and errors around it."""

from __future__ import annotations

import copy

import pytest
import torch

from memory_reference import reference_logits
from streamingllm import BlockMemory, MemoryCache, SinkCache, generate, generate_tokens, prefill
from streamingllm.cache import BlockStore
from streamingllm.checks import ArgumentError
from streamingllm.compat import cache_kwargs
from streamingllm.families import UnsupportedModelError
from tiny import tiny_model

S, W = 4, 24
MEMORY = BlockMemory(block_size=8, top_k=2, repr_keys=3, chunk_size=6)
#: Chunks of the lookup size, then single tokens (decode steps): both paths of a forward.
CHUNKS = [6] * 40 + [1] * 24


def _stream(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


def _fast(model, ids: torch.Tensor, memory: BlockMemory = MEMORY, chunks=CHUNKS) -> tuple[torch.Tensor, MemoryCache]:
    cache = MemoryCache(model, S, W, memory)
    out, done = [], 0
    for q in chunks:
        out.append(prefill(model, cache, ids[None, done : done + q], chunk_size=q, return_all_logits=True)[0])
        done += q
    return torch.cat(out), cache


def _logp(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.double(), dim=-1)


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3", "gemma3"])  # GQA, MQA, q/k norms, hybrid
def test_the_fast_memory_equals_the_float64_reference(family):
    """float32 fast path vs float64 reference over a long evicting stream: every token's
    log-probabilities within 1e-4, and the same blocks retrieved by every layer."""
    model = tiny_model(family)
    ids = _stream(sum(CHUNKS))
    fast, cache = _fast(model, ids)
    ref, ref_cache = reference_logits(copy.deepcopy(model).double(), ids, S, W, MEMORY, list(CHUNKS))
    assert cache.memory_blocks == (sum(CHUNKS) - S - W) // MEMORY.block_size > 20
    assert (_logp(fast) - _logp(ref)).abs().max().item() < 1e-4
    retrieved = cache.retrieved()
    assert retrieved == {i: layer.retrieved for i, layer in enumerate(ref_cache.layers) if layer.native_window is None}
    assert all(len(blocks) == MEMORY.top_k for blocks in retrieved.values())
    # the memory changes the predictions: streaming (same sinks and window) is far from it
    streaming = prefill(model, SinkCache(model, S, W), ids[None], chunk_size=1, return_all_logits=True)[0]
    assert (_logp(fast) - _logp(streaming)).abs().max().item() > 1e-2


def test_looking_up_every_few_forwards_equals_the_reference():
    """``lookup_every=3``: the blocks chosen are kept for two more forwards, in both paths; and the
    choice differs from looking up every forward."""
    model = tiny_model("qwen3")
    ids = _stream(sum(CHUNKS))
    sparse = BlockMemory(block_size=8, top_k=2, repr_keys=3, chunk_size=6, lookup_every=3)
    fast, cache = _fast(model, ids, sparse)
    ref, _ = reference_logits(copy.deepcopy(model).double(), ids, S, W, sparse, list(CHUNKS))
    assert (_logp(fast) - _logp(ref)).abs().max().item() < 1e-4
    every, _ = _fast(model, ids)
    assert (_logp(fast) - _logp(every)).abs().max().item() > 1e-3


def test_the_comparison_can_fail():
    """Negative controls: the reference with another top-k, or other representative keys, is far."""
    model = tiny_model("llama")
    ids = _stream(sum(CHUNKS))
    fast, _ = _fast(model, ids)
    m64 = copy.deepcopy(model).double()
    for other in (BlockMemory(block_size=8, top_k=1, repr_keys=3, chunk_size=6),
                  BlockMemory(block_size=8, top_k=2, repr_keys=1, chunk_size=6)):
        ref, _ = reference_logits(m64, ids, S, W, other, list(CHUNKS))
        assert (_logp(fast) - _logp(ref)).abs().max().item() > 1e-3


def test_the_lookup_returns_the_planted_block_and_not_in_a_control():
    torch.manual_seed(0)
    store = BlockStore(BlockMemory(block_size=4, top_k=3, repr_keys=1))
    direction = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    for b in range(40):
        summary = torch.randn(2, 16)
        summary -= (summary * direction).sum(-1, keepdim=True) * direction  # nothing along the planted direction
        if b == 17:
            summary += 6.0 * direction
        store.add(torch.randn(2, 4, 16), torch.randn(2, 4, 16), summary)
    assert 17 in store.lookup(direction) and store.lookup(direction, k=1) == [17]
    assert 17 not in store.lookup(-direction)  # the control: the planted block scores lowest
    assert store.lookup(direction) == sorted(store.lookup(direction))  # stream order


def test_accelerator_memory_stays_bounded_and_the_store_spills(tmp_path):
    model = tiny_model("llama")
    ids = _stream(1500, seed=3)
    memory = BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8)
    cache = MemoryCache(model, S, W, memory)
    held, stored = [], []
    for start in range(0, len(ids), 8):
        prefill(model, cache, ids[None, start : start + 8], chunk_size=8)
        held.append(sum(t.numel() * t.element_size() for t in cache.accelerator_tensors()))
        stored.append(cache.store_bytes()[0])
    assert max(held[20:]) == held[-1]  # flat once the window is full
    assert stored[-1] > 10 * stored[20] > 0  # the blocks live in the store, which grows with the stream

    bounded = MemoryCache(model, S, W, BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8, max_cpu_blocks=5,
                                                   spill_dir=str(tmp_path)))
    free = MemoryCache(model, S, W, memory)
    a = prefill(model, bounded, ids[None], chunk_size=8, return_all_logits=True)
    b = prefill(model, free, ids[None], chunk_size=8, return_all_logits=True)
    assert torch.equal(a, b)  # spilled blocks come back bit for bit
    resident, spilled = bounded.store_bytes()
    assert spilled > resident > 0 and all(len(layer.store._resident) == 5 for layer in bounded.layers)
    bounded.close()
    assert not list(tmp_path.iterdir())

    forgetful = MemoryCache(model, S, W, BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8, max_cpu_blocks=5))
    prefill(model, forgetful, ids[None], chunk_size=8)
    for layer in forgetful.layers:
        assert layer.retrieved and not set(layer.retrieved) & layer.store.forgotten


def test_a_saved_state_continues_exactly(tmp_path):
    model = tiny_model("gemma3")
    ids = _stream(300)
    cache = MemoryCache(model, S, W, MEMORY)
    prefill(model, cache, ids[None, :200], chunk_size=6)
    torch.save(cache.state_dict(), tmp_path / "state.pt")
    restored = MemoryCache(model, S, W, MEMORY)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    a = prefill(model, cache, ids[None, 200:], chunk_size=6, return_all_logits=True)
    b = prefill(model, restored, ids[None, 200:], chunk_size=6, return_all_logits=True)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="state is for"):
        MemoryCache(model, S, W + 1, MEMORY).load_state_dict(cache.state_dict())


@pytest.mark.parametrize("bound", ["unbounded", "spilling"])
def test_a_state_shares_the_blocks_and_stays_as_it_was_while_the_stream_goes_on(tmp_path, bound):
    """state_dict() shares the store's blocks (written once) instead of copying them, spilled ones
    mapped from their files: the state taken at 200 tokens is still, bit for bit, what it was
    after 400 more (more blocks, more spills, the spill directory removed), and continues exactly."""
    from streamingllm.serve.delta import decode, encode, states_equal

    extra = {"max_cpu_blocks": 3, "spill_dir": str(tmp_path)} if bound == "spilling" else {}
    memory = BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8, **extra)
    model = tiny_model("llama")
    ids = _stream(600, seed=4)
    cache = MemoryCache(model, S, W, memory)
    prefill(model, cache, ids[None, :200], chunk_size=8)
    state = cache.state_dict()
    snapshot = decode(encode(state))  # a copy, bits and all
    block = state["layers"][0]["store"]["blocks"][-1][0]
    assert any(block is t for t in cache.layers[0].store.keys)  # shared, not copied
    after = prefill(model, cache, ids[None, 200:], chunk_size=8, return_all_logits=True)
    cache.close()
    assert states_equal(state, snapshot)
    restored = MemoryCache(model, S, W, memory)
    restored.load_state_dict(state)
    assert torch.equal(prefill(model, restored, ids[None, 200:], chunk_size=8, return_all_logits=True), after)
    restored.close()


def test_model_generate_and_the_library_loop_agree():
    """transformers' generate() (positions from get_seq_length) and generate_tokens (in-cache
    positions) write the same tokens. 145 = 24 chunks of 6 and one token, both ways (a lookup serves
    one chunk, so the chunks must match)."""
    model = tiny_model("llama")
    ids = _stream(145)
    a = generate(model, ids[None], MemoryCache(model, S, W, MEMORY), chunk_size=6, max_new_tokens=30, do_sample=False)
    b = torch.stack(list(generate_tokens(model, MemoryCache(model, S, W, MEMORY), ids[None], 30, chunk_size=6)), dim=1)
    assert torch.equal(a[:, 145:], b)


def test_bad_settings_and_forwards_are_refused_clearly():
    with pytest.raises(ArgumentError, match="top_k"):
        BlockMemory(top_k=-1)
    with pytest.raises(ArgumentError, match="repr_keys"):
        BlockMemory(block_size=4, repr_keys=5)
    with pytest.raises(ArgumentError, match="spill_dir needs max_cpu_blocks"):
        BlockMemory(spill_dir="/tmp/x")
    with pytest.raises(UnsupportedModelError, match="RoPE"):
        MemoryCache(tiny_model("bloom"), S, W, MEMORY)
    with pytest.raises(ArgumentError, match="memory"):
        MemoryCache(tiny_model("llama"), S, W, memory={"top_k": 2})
    model = tiny_model("llama")
    cache = MemoryCache(model, S, W, MEMORY)
    model(input_ids=_stream(20)[None], **cache_kwargs(model, cache))  # fits: nothing is evicted
    with pytest.raises(ValueError, match="chunk_size = 6"):
        model(input_ids=_stream(20)[None], **cache_kwargs(model, cache))
