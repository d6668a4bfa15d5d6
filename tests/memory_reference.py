"""The slow, obviously correct reference of the memory of evicted blocks (InfLLM on StreamingLLM).

Written from the definition in docs/design.md ("A memory of evicted blocks"), not from the fast
code. It runs in float64, keeps every token as a record (its key *before* RoPE, its value, the
attention it received), and at every forward:

1. scores every block with plain loops: ``sum over query heads, queries and representative keys of
   q . r``, the queries moved to the memory's position; the ``top_k`` best blocks (ties: the older
   block) are retrieved;
2. lists every attended token with its in-cache position (sinks ``0..S-1``, all memory tokens at
   ``S``, the window after it, the new tokens last), rotates each raw key there, and computes the
   softmax attention per head and query;
3. adds each token's received attention (summed over the queries and the query heads of its
   key/value head) to its score, and moves tokens: the first S to the sinks, the rest to the window,
   the window's overflow to the partial block, a full partial block to a block whose representative
   keys are, per key/value head, its ``repr_keys`` most-attended tokens (ties: the older token).

Sliding layers keep their last ``sliding_window - 1`` raw keys, rotated to their true distance.
The model is fed the in-cache positions, as the library's loops feed the fast cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from streamingllm.attention import attach_memory, use_sink_attention
from streamingllm.cache import BlockMemory
from streamingllm.cache.groups import GLOBAL, layer_policies
from streamingllm.compat import cache_kwargs
from streamingllm.families import family_of, layer_types_of, rope_inv_freq, sliding_window_of

from reference import _rotate


class Record:
    """One token: its raw key and value (kv_heads, head_dim), and its score (kv_heads,)."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value
        self.score = torch.zeros(key.shape[0], dtype=torch.float64)


class RefLayer(DynamicLayer):
    def __init__(self, cache, inv_freq, native_window):
        super().__init__()
        self.cache, self.inv_freq, self.native_window = cache, inv_freq, native_window
        self.sinks, self.window, self.partial = [], [], []
        self.blocks: list[tuple[list[Record], list[list[torch.Tensor]]]] = []  # (records, repr keys per kv head)
        self.retrieved: list[int] = []
        self.n = 0

    def update(self, key_states, value_states, *args, **kwargs):
        self.is_initialized = True
        p, q = self.cache.frame
        raw = _rotate(key_states.double(), -torch.arange(p, p + q), self.inv_freq)[0]  # (kv, q, d)
        view = RefView(self, raw, value_states[0].double())
        attach_memory(key_states, view)
        return key_states, value_states

    def get_seq_length(self):
        return self.cache.seen

    def get_mask_sizes(self, query_length):
        return query_length, 0


class RefView:
    def __init__(self, layer: RefLayer, raw: torch.Tensor, values: torch.Tensor):
        self.layer, self.raw, self.values = layer, raw, values

    def attend(self, module, query, key, scaling, softcap):
        layer, cache = self.layer, self.layer.cache
        mem: BlockMemory = cache.memory
        p, q = cache.frame
        query = query[0].double()  # (heads, q, d) at model positions p + i
        heads, kv = query.shape[0], self.raw.shape[0]
        group = heads // kv
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        new = [Record(self.raw[:, i], self.values[:, i]) for i in range(q)]
        # (record, in-cache position); the new tokens' in-cache positions follow the held ones
        if layer.native_window is not None:  # sliding: true distances, the query at p + i
            attended = [(r, p - len(layer.window) + j) for j, r in enumerate(layer.window)]
            attended += [(r, p + i) for i, r in enumerate(new)]
            first_new = len(layer.window)

            def visible(i, k):
                return k <= first_new + i and first_new + i - k < layer.native_window
        else:
            memory_slot = 1 if (layer.partial or layer.blocks) else 0
            C = len(layer.sinks) + memory_slot + len(layer.window)
            frame = p - C
            S_pos = len(layer.sinks)
            layer.retrieved = self._lookup(query, frame + S_pos, group, mem)
            memory = [r for b in layer.retrieved for r in layer.blocks[b][0]] + layer.partial
            attended = [(r, frame + s) for s, r in enumerate(layer.sinks)]
            attended += [(r, frame + S_pos) for r in memory]
            attended += [(r, frame + S_pos + memory_slot + j) for j, r in enumerate(layer.window)]
            attended += [(r, p + i) for i, r in enumerate(new)]
            first_new = len(attended) - q

            def visible(i, k):
                return k < first_new or k <= first_new + i

        out = torch.zeros((q, heads, query.shape[-1]), dtype=torch.float64)
        keys = torch.stack([_rotate(r.key[None, :, None], torch.tensor([pos]), layer.inv_freq)[0, :, 0]
                            for r, pos in attended], dim=1)  # (kv, T, d)
        values = torch.stack([r.value for r, _ in attended], dim=1)
        received = torch.zeros((kv, len(attended)), dtype=torch.float64)
        for h in range(heads):
            g = h // group
            for i in range(q):
                logits = (keys[g] @ query[h, i]) * scaling
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                ok = torch.tensor([visible(i, k) for k in range(len(attended))])
                probs = torch.softmax(logits.masked_fill(~ok, float("-inf")), dim=-1)
                out[i, h] = probs @ values[g]
                received[g] += probs
        scored = set(map(id, layer.window + new))  # a token's score counts while it is in the window
        for k, (r, _) in enumerate(attended):
            if id(r) in scored:
                r.score = r.score + received[:, k]
        self._commit(new, mem)
        return out.to(query.dtype)[None]

    def _lookup(self, query, memory_position, group, mem):
        layer = self.layer
        if not layer.blocks or not mem.top_k:
            return []
        if layer.cache.forwards % mem.lookup_every and layer.retrieved:  # between lookups: the last choice
            return layer.retrieved
        moved = _rotate(query[None], -torch.full((query.shape[1],), memory_position), layer.inv_freq)[0]
        scores = []
        for b, (_, reprs) in enumerate(layer.blocks):
            total = 0.0
            for h in range(query.shape[0]):
                for i in range(query.shape[1]):
                    for r in reprs[h // group]:
                        total += float(torch.dot(moved[h, i], r))
            scores.append((-total, b))
        return sorted(b for _, b in sorted(scores)[: mem.top_k])

    def _commit(self, new, mem):
        layer, cache = self.layer, self.layer.cache
        if layer.native_window is not None:
            layer.window = (layer.window + new)[-(layer.native_window - 1) :]
            return
        for r in new:
            (layer.sinks if len(layer.sinks) < cache.sink_size else layer.window).append(r)
        while len(layer.window) > cache.window_size:
            layer.partial.append(layer.window.pop(0))
        while len(layer.partial) >= mem.block_size:
            block, layer.partial = layer.partial[: mem.block_size], layer.partial[mem.block_size :]
            reprs = []
            for g in range(block[0].key.shape[0]):
                ranked = sorted(range(len(block)), key=lambda t: (-float(block[t].score[g]), t))
                reprs.append([block[t].key[g] for t in ranked[: mem.repr_keys]])
            layer.blocks.append((block, reprs))


class ReferenceMemoryCache(Cache):
    """The reference cache; feed it chunks of ``memory.chunk_size`` with :func:`reference_logits`."""

    def __init__(self, model, sink_size: int, window_size: int, memory: BlockMemory):
        use_sink_attention(model)
        config = model.config
        family = family_of(config)
        policies = layer_policies(config, family, sink_size, window_size)
        types = layer_types_of(config, family)
        native = sliding_window_of(config, family)
        self.sink_size, self.window_size, self.memory = sink_size, window_size, memory
        self.seen, self.frame, self.forwards = 0, (0, 0), -1
        self.position = 0  # in-cache position of the next token (full-attention layers)
        super().__init__(layers=[RefLayer(self, rope_inv_freq(model, t).double(), None if pol == GLOBAL else native)
                                 for t, pol in zip(types, policies)])

    def next_position(self) -> int:
        glob = next(layer for layer in self.layers if layer.native_window is None)
        slot = 1 if (glob.partial or glob.blocks) else 0
        return len(glob.sinks) + slot + len(glob.window)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            self.frame = (self.next_position(), key_states.shape[-2])
            self.forwards += 1
        out = self.layers[layer_idx].update(key_states, value_states)
        if layer_idx == len(self.layers) - 1:
            self.seen += key_states.shape[-2]
        return out

    def get_seq_length(self, layer_idx=0):
        return self.seen


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor, sink_size: int, window_size: int, memory: BlockMemory,
                     chunk_sizes: list[int] | None = None) -> tuple[torch.Tensor, ReferenceMemoryCache]:
    """Per-token logits (T, vocab) of ``model`` (run it in float64) streaming ``ids`` (T,) through the
    reference, in chunks of ``memory.chunk_size`` (or the sizes given)."""
    cache = ReferenceMemoryCache(model, sink_size, window_size, memory)
    out, done = [], 0
    sizes = chunk_sizes or []
    while done < len(ids):
        q = sizes.pop(0) if sizes else memory.chunk_size
        piece = ids[done : done + q]
        p = cache.next_position()
        logits = model(input_ids=piece[None], use_cache=True, **cache_kwargs(model, cache),
                       position_ids=torch.arange(p, p + len(piece))[None]).logits[0]
        out.append(logits)
        done += len(piece)
    return torch.cat(out), cache
