"""MemoryCache: StreamingLLM's sinks and window, plus a memory of the evicted blocks (InfLLM).

Each forward of ``q`` tokens (a chunk of a prompt, or one decode step) in a full-attention layer:

1. the cache returns the new keys with a view attached; the attention (transformers' attention
   interface, :mod:`streamingllm.attention`) hands the view the queries;
2. the view sums the chunk's queries, scores every block of the layer's :class:`~.blocks.BlockStore`
   and fetches the ``top_k`` best;
3. the queries attend to ``[sinks | retrieved blocks + partial block | window | new]``, with the keys
   rotated where they are placed: sinks at ``0 .. S-1``, every memory token at ``S`` (one fixed
   position: its distance to the query is the window's length plus one), the window after it, the new tokens
   last (causal among themselves). Keys are stored *without* rotation (the model's rotation is undone
   once, in at least float32, from float64 angles) and rotated when placed;
4. the attention each window token received is added to its score; tokens pushed out of the window
   go to the partial block, and a full partial block becomes a block whose representative keys are
   its most-attended tokens.

Sliding layers of hybrid models (Gemma 2/3) keep exactly their own window and no memory, as in
:class:`~streamingllm.cache.SinkCache`. Batches of one stream; RoPE families whose attention goes
through the sdpa or eager interface. The accelerator holds the sinks, the window, the partial block
and at most ``top_k`` blocks at a time, however long the stream; the blocks themselves stay in the
store (CPU memory, optionally bounded and spilled to disk). See docs/design.md for the design and
where it departs from the paper; ``tests/memory_reference.py`` is the slow reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..attention import attach_memory, use_sink_attention
from ..checks import ArgumentTypeError, check_int
from ..compat import update_position_ids
from ..families import UnsupportedModelError, layer_types_of, rope_inv_freq, sliding_window_of
from ..rotation import Rotator, compute_dtype
from .blocks import BlockMemory, BlockStore
from .checks import check_cache_sizes, check_model
from .groups import GLOBAL, layer_policies


@dataclass(frozen=True)
class Counts:
    """What every full-attention layer holds between two forwards (tokens)."""

    seen: int = 0  # tokens of the stream consumed
    n_sink: int = 0
    window: int = 0
    partial: int = 0  # evicted tokens not yet in a block
    blocks: int = 0

    @property
    def memory_slot(self) -> int:
        """1 once anything has been evicted: the position the memory tokens take."""
        return 1 if self.partial or self.blocks else 0

    @property
    def query_position(self) -> int:
        """In-cache position of the next token."""
        return self.n_sink + self.memory_slot + self.window

    def after(self, q: int, sink_size: int, window_size: int, block_size: int) -> Counts:
        """The counts once ``q`` more tokens have been consumed."""
        take = min(sink_size - self.n_sink, q)
        window = self.window + q - take
        over = max(0, window - window_size)
        partial = self.partial + over
        return Counts(self.seen + q, self.n_sink + take, window - over, partial % block_size,
                      self.blocks + partial // block_size)


def _evicted(c: Counts, n: int, block_size: int) -> Counts:
    """The counts once ``n`` of the window's oldest tokens have gone to the memory."""
    partial = c.partial + n
    return Counts(c.seen, c.n_sink, c.window - n, partial % block_size, c.blocks + partial // block_size)


class Fifo:
    """Rows of keys, values and scores (tokens in stream order) in a buffer with slack, so that
    appending and popping from the front copy nothing but the new rows (compacted now and then).

    Shapes: keys/values (kv_heads, n, head_dim), scores (kv_heads, n)."""

    def __init__(self):
        self.k = self.v = self.s = None
        self.lo = self.hi = 0

    def __len__(self) -> int:
        return self.hi - self.lo

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = self.lo, self.hi
        if self.k is None:
            raise RuntimeError("Fifo.view: nothing stored yet")
        return self.k[:, lo:hi], self.v[:, lo:hi], self.s[:, lo:hi]

    def append(self, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> None:
        n = k.shape[1]
        if self.k is None:
            cap = max(64, 2 * n)
            self.k = k.new_zeros((k.shape[0], cap, k.shape[2]))
            self.v = v.new_zeros((v.shape[0], cap, v.shape[2]))
            self.s = s.new_zeros((s.shape[0], cap))
        if self.hi + n > self.k.shape[1]:
            held = len(self)
            cap = max(self.k.shape[1], 2 * (held + n))
            for name in ("k", "v", "s"):
                old = getattr(self, name)
                new = old.new_zeros((old.shape[0], cap, *old.shape[2:]))
                new[:, :held] = old[:, self.lo : self.hi]
                setattr(self, name, new)
            self.lo, self.hi = 0, held
        self.k[:, self.hi : self.hi + n] = k
        self.v[:, self.hi : self.hi + n] = v
        self.s[:, self.hi : self.hi + n] = s
        self.hi += n

    def pop(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove and return (copies of) the ``n`` oldest rows."""
        lo = self.lo
        out = (self.k[:, lo : lo + n].clone(), self.v[:, lo : lo + n].clone(), self.s[:, lo : lo + n].clone())
        self.lo += n
        return out

    def to(self, device) -> None:
        """Move the rows to ``device``."""
        if self.k is not None and self.k.device != torch.device(device):
            self.k, self.v, self.s = (t.to(device) for t in (self.k, self.v, self.s))

    def add_scores(self, s: torch.Tensor) -> None:
        self.s[:, self.lo : self.hi] += s

    def state(self):
        return None if self.k is None else tuple(t.clone() for t in self.view())

    def restore(self, state) -> None:
        self.k = self.v = self.s = None
        self.lo = self.hi = 0
        if state is not None:
            self.append(*state)


class MemoryLayer(DynamicLayer):
    """One layer of a :class:`MemoryCache`: its sinks, window, partial block and blocks (full
    attention), or its own sliding window (``native_window``: tokens seen by a query, itself included)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, cache: MemoryCache, index: int, rotator: Rotator, native_window: int | None):
        super().__init__()
        self.cache, self.index, self.rotator = cache, index, rotator
        self.native_window = native_window
        self.is_sliding = native_window is not None
        self.sinks, self.window, self.partial = Fifo(), Fifo(), Fifo()
        self.store = None if self.is_sliding else BlockStore(cache.memory)
        self.pending: MemoryView | None = None
        self.retrieved: list[int] = []  # the blocks the last forward attended to
        self.fetched: tuple | None = None  # (blocks, keys, values) copied in for them

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Take the model's device and dtype; a restored state (read onto the CPU) moves there."""
        self.dtype, self.device = key_states.dtype, key_states.device
        for fifo in (self.sinks, self.window, self.partial):
            fifo.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Attach the view the attention completes (see the module docstring); the new keys and
        values are returned as they came."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError("MemoryCache: the previous forward did not finish in this layer (an exception inside "
                               "the model, or an attention other than streamingllm's: build the cache from the "
                               "model, with attn_implementation 'sdpa' or 'eager'); call reset()")
        if key_states.shape[0] != 1:
            raise ValueError(f"MemoryCache holds one stream; got a batch of {key_states.shape[0]}")
        p, q = self.cache.frame
        keys = key_states[0].to(compute_dtype(key_states.dtype))
        raw = self.rotator.rotate_by(keys, _positions(-p, q, -1))  # the model's rotation undone
        self.pending = MemoryView(self, raw, value_states[0])
        attach_memory(key_states, self.pending)
        return key_states, value_states

    def to_memory(self, n: int) -> None:
        """Move the window's ``n`` oldest tokens to the partial block; a full partial block becomes a
        block, its representative keys its most-attended tokens (per key/value head)."""
        self.partial.append(*self.window.pop(n))
        B, R = self.cache.memory.block_size, self.cache.memory.repr_keys
        while len(self.partial) >= B:
            k, v, s = self.partial.pop(B)
            best = torch.topk(s, R, dim=1).indices  # (kv_heads, R)
            summary = torch.gather(k.float(), 1, best[..., None].expand(-1, -1, k.shape[-1])).sum(dim=1)
            self.store.add(k, v, summary)

    def get_seq_length(self) -> int:
        return self.cache.counts.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # the view builds its own mask; the model's is not used

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.sinks, self.window, self.partial = Fifo(), Fifo(), Fifo()
        if self.store is not None:
            self.store.close()
            self.store = BlockStore(self.cache.memory)
        self.pending, self.retrieved, self.fetched = None, [], None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("MemoryCache cannot be cropped")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("MemoryCache holds one stream: no beam search")

    def state(self) -> dict:
        return {"sinks": self.sinks.state(), "window": self.window.state(), "partial": self.partial.state(),
                "store": None if self.store is None else self.store.state()}

    def restore(self, state: dict) -> None:
        """Put back a :meth:`state` (onto the device of the layer's first forward, once it runs)."""
        self.reset()
        self.sinks.restore(state["sinks"])
        self.window.restore(state["window"])
        self.partial.restore(state["partial"])
        if self.is_initialized:
            for fifo in (self.sinks, self.window, self.partial):
                fifo.to(self.device)
        if state["store"] is not None:
            self.store.restore(state["store"])


class MemoryView:
    """One layer's forward, completed by the attention when it has the queries (:meth:`attend`)."""

    def __init__(self, layer: MemoryLayer, raw_keys: torch.Tensor, values: torch.Tensor):
        self.layer, self.raw_keys, self.values = layer, raw_keys, values

    def attend(self, module, query: torch.Tensor, key: torch.Tensor, scaling: float | None, softcap: float | None):
        """The attention output (1, q, heads, head_dim) of ``query`` (1, heads, q, head_dim), as the
        model rotated it; ``key``: the new keys as the model rotated them."""
        layer, cache = self.layer, self.layer.cache
        layer.pending = None
        p, q = cache.frame
        before = cache.before
        if scaling is None:
            scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        dtype = compute_dtype(query.dtype)
        rot = layer.rotator
        if layer.is_sliding:
            w = len(layer.window)
            keys, values, parts = [], [], []
            if w:
                k, v, _ = layer.window.view()
                keys.append(rot.rotate_by(k, _positions(p - w, w)))
                values.append(v)
            allowed = _sliding_allowed(w, q, layer.native_window, query.device)
        else:
            frame = p - before.query_position  # model position of in-cache position 0
            keys, values = [], []
            n_s = len(layer.sinks)
            if n_s:
                k, v, _ = layer.sinks.view()
                keys.append(rot.rotate_by(k, _positions(frame, n_s)))
                values.append(v)
            mem_k, mem_v = self._memory(query, frame + n_s, dtype)
            if mem_k is not None:
                keys.append(rot.rotate_by(mem_k, (frame + n_s,)))
                values.append(mem_v)
            w = len(layer.window)
            if w:
                k, v, _ = layer.window.view()
                start = frame + n_s + before.memory_slot
                keys.append(rot.rotate_by(k, _positions(start, w)))
                values.append(v)
            held = sum(k.shape[1] for k in keys)
            allowed = _allowed(held, q, query.device)
            parts = [held - w, w]
        keys.append(key[0].to(dtype))
        values.append(self.values)
        K, V = torch.cat([k.to(dtype) for k in keys], dim=1), torch.cat([v.to(dtype) for v in values], dim=1)
        out, received = _attention(query[0].to(dtype), K, V, allowed, scaling, softcap)
        self._commit(received, parts)
        return out.to(query.dtype)[None]

    def _memory(self, query: torch.Tensor, memory_position: int, dtype: torch.dtype):
        """The retrieved blocks' and the partial block's unrotated keys and values (kv_heads, n, head_dim)."""
        layer = self.layer
        store = layer.store
        keys, values = [], []
        memory = store.memory
        if len(store) and memory.top_k:
            if layer.cache.forwards % memory.lookup_every == 0 or not layer.retrieved:
                kv = store.summaries.shape[1]
                q = query[0].to(torch.float32)  # (heads, q, head_dim), at the model's positions
                summed = q.reshape(kv, -1, q.shape[-1])  # the query heads of each kv head, all queries
                summed = layer.rotator.rotate_by(summed, (-memory_position,)).sum(dim=1)
                layer.retrieved = store.lookup(summed)
            else:  # between lookups: the blocks chosen last, less any forgotten since
                layer.retrieved = [b for b in layer.retrieved if b not in store.forgotten]
            if layer.retrieved:
                chosen = tuple(layer.retrieved)
                if layer.fetched is None or layer.fetched[0] != chosen:  # the same blocks: not copied again
                    k, v = store.fetch(layer.retrieved, query.device, dtype)
                    layer.fetched = (chosen, k[0], v[0])
                keys.append(layer.fetched[1])
                values.append(layer.fetched[2])
        if len(layer.partial):
            k, v, _ = layer.partial.view()
            keys.append(k)
            values.append(v)
        if not keys:
            return None, None
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)

    def _commit(self, received: torch.Tensor, parts: list[int]) -> None:
        """Store the new tokens where they go and move evicted ones towards the blocks.

        ``received``: (kv_heads, keys) attention each key received from this forward's queries."""
        layer, cache = self.layer, self.layer.cache
        q = self.raw_keys.shape[1]
        new_scores = received[:, -q:].float()
        if layer.is_sliding:
            layer.window.append(self.raw_keys, self.values, new_scores)
            over = len(layer.window) - (layer.native_window - 1)
            if over > 0:
                layer.window.pop(over)
            return
        memory_part, w = parts
        if w:
            layer.window.add_scores(received[:, memory_part : memory_part + w].float())
        take = min(cache.sink_size - len(layer.sinks), q)
        if take:
            layer.sinks.append(self.raw_keys[:, :take], self.values[:, :take], new_scores[:, :take])
        if take < q:
            layer.window.append(self.raw_keys[:, take:], self.values[:, take:], new_scores[:, take:])
        over = len(layer.window) - cache.window_size
        if over > 0:
            layer.to_memory(over)


@lru_cache(maxsize=256)
def _positions(start: int, n: int, step: int = 1) -> tuple[int, ...]:
    """``(start, start + step, ...)``, ``n`` of them: the rotation deltas of a run of keys (the same
    runs recur at every layer and, once the cache is full, at every step; built once)."""
    return tuple(range(start, start + step * n, step))


@lru_cache(maxsize=64)
def _allowed(held: int, q: int, device) -> torch.Tensor:
    """(q, held + q): every query sees everything held, and the new tokens up to itself."""
    allowed = torch.ones((q, held + q), dtype=torch.bool, device=device)
    allowed[:, held:] = torch.ones((q, q), dtype=torch.bool, device=device).tril()
    return allowed


@lru_cache(maxsize=64)
def _sliding_allowed(w: int, q: int, window: int, device) -> torch.Tensor:
    """(q, w + q): query ``i`` sees the tokens at most ``window - 1`` before it, and itself."""
    at = w + torch.arange(q, device=device)[:, None]
    keys = torch.arange(w + q, device=device)[None, :]
    return (keys <= at) & (keys > at - window)


def _attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scaling: float,
               softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out, so the probabilities are at hand.

    Args:
        query: (heads, q, head_dim); keys, values: (kv_heads, T, head_dim); allowed: (q, T) bool.

    Returns:
        The output (q, heads, head_dim) and the attention each key received, summed over the
        queries and the query heads of its key/value head: (kv_heads, T).
    """
    h, q, d = query.shape
    kv = keys.shape[0]
    grouped = query.reshape(kv, (h // kv) * q, d)
    logits = torch.matmul(grouped, keys.transpose(-1, -2)) * scaling  # (kv, g*q, T)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.reshape(kv, h // kv, q, -1).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs.reshape(kv, (h // kv) * q, -1), values).reshape(h, q, d)
    return out.transpose(0, 1), probs.sum(dim=(1, 2))


class MemoryCache(Cache):
    """Attention sinks, a rolling window, and a memory of the evicted blocks (InfLLM's design on
    StreamingLLM's cache).

    Args:
        model_or_config: the model (its attention is switched to streamingllm's sdpa/eager variant,
            which completes each layer's forward) or, for tests, its config.
        sink_size: initial tokens kept as attention sinks (tokens, >= 0).
        window_size: most recent tokens kept (tokens, >= 1).
        memory: the :class:`~streamingllm.cache.BlockMemory` settings (block size, blocks retrieved,
            representative keys, queries per lookup, where blocks are kept).

    Use it as a :class:`~streamingllm.cache.SinkCache`: ``model(ids, past_key_values=c,
    position_ids=c.position_ids(q))``, ``model.generate`` for short prompts, and the library's
    loops (:func:`~streamingllm.feed.generate_tokens`, :func:`~streamingllm.feed.generate`,
    :class:`~streamingllm.session.Session`), which cut prompts into chunks of ``memory.chunk_size``.
    """

    def __init__(self, model_or_config, sink_size: int = 4, window_size: int = 1020,
                 memory: BlockMemory | None = None):
        sink_size, window_size = check_cache_sizes(sink_size, window_size)
        memory = BlockMemory() if memory is None else memory
        if not isinstance(memory, BlockMemory):
            raise ArgumentTypeError("memory", "must be a streamingllm.BlockMemory", memory)
        config, family = check_model(model_or_config, sink_size, window_size)
        if family.positions != "rope":
            raise UnsupportedModelError(f"the memory of evicted blocks needs RoPE positions; {family.name} has "
                                        f"{family.positions}")
        if isinstance(model_or_config, torch.nn.Module) and not use_sink_attention(model_or_config):
            raise UnsupportedModelError("the memory of evicted blocks needs attn_implementation 'sdpa' or 'eager'")
        policies = layer_policies(config, family, sink_size, window_size)
        if GLOBAL not in policies:
            raise UnsupportedModelError("every layer of this model slides over its own window: there is no "
                                        "full-attention layer to give a memory")
        types = layer_types_of(config, family)
        rotators = {t: Rotator(rope_inv_freq(model_or_config, t)) for t in set(types)}
        native = sliding_window_of(config, family)
        self.config, self.family, self.memory = config, family, memory
        self.sink_size, self.window_size = sink_size, window_size
        self.num_layers = config.num_hidden_layers
        self.layer_policies = policies
        self.counts = Counts()
        self.before = Counts()  # the counts when the running forward began
        self.forwards = -1  # forwards begun, minus one: the running forward's index
        self._next_layer = 0  # the layer whose update the running forward calls next
        self.frame = (0, 0)  # (model position of the running forward's first token, its tokens)
        super().__init__(layers=[MemoryLayer(self, i, rotators[types[i]], None if p == GLOBAL else native)
                                 for i, p in enumerate(policies)])

    # --- one forward ------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx != self._next_layer:
            raise RuntimeError(f"MemoryCache: the previous forward stopped after layer {self._next_layer - 1} of "
                               f"{self.num_layers} (an exception inside the model), so the layers hold different "
                               "tokens; call reset()")
        if layer_idx == 0:
            self._plan(key_states.shape[-2], kwargs)
        self._next_layer = (layer_idx + 1) % self.num_layers
        return self.layers[layer_idx].update(key_states, value_states)

    def _plan(self, q: int, kwargs: dict) -> None:
        c = self.counts
        if q > self.memory.chunk_size and c.seen + q > self.sink_size + self.window_size:
            raise ValueError(f"MemoryCache: a forward of {q} tokens; once the window overflows, a forward looks up "
                             f"the memory for at most memory.chunk_size = {self.memory.chunk_size} queries. Feed "
                             "prompts with streamingllm.prefill / generate (they cut them), or raise chunk_size")
        positions = update_position_ids(kwargs)
        p = c.seen if positions is None else int(positions[0, 0])  # none: the model put them at get_seq_length()
        self.frame = (p, q)
        self.forwards += 1
        self.before = c
        self.counts = c.after(q, self.sink_size, self.window_size, self.memory.block_size)

    def position_ids(self, q: int, device=None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Position ids (1, q) of the next ``q`` tokens: their in-cache positions (small, whatever the
        stream's length)."""
        p = self.counts.query_position
        if out is not None:
            return torch.arange(p, p + q, out=out.view(-1)).view(1, q)
        return torch.arange(p, p + q, device=device)[None]

    def evict(self, n: int) -> None:
        """Move the window's ``n`` oldest tokens to the memory now (a conversation evicting whole
        turns: :class:`~streamingllm.session.Session` with ``evict="turns"``). The sliding layers of a
        hybrid model keep their own window."""
        n = check_int("n", n, 0, self.counts.window)
        if not n:
            return
        for layer in self.layers:
            if not layer.is_sliding:
                layer.to_memory(n)
        self.counts = _evicted(self.counts, n, self.memory.block_size)

    # --- what the feeding loops ask -----------------------------------------------------------

    #: Streams of a memory cache are decoded one by one (no shared batched forward).
    can_stack = False

    @property
    def chunk_limit(self) -> int:
        """The most tokens one forward may take once the window overflows (``memory.chunk_size``)."""
        return self.memory.chunk_size

    exact_chunks = True

    def exact_chunk_mask(self, q: int, dtype=None, device=None) -> None:
        """None: the memory's attention builds each forward's mask itself."""
        return None

    def allow_fast_chunk(self, q: int) -> None:
        """Nothing to allow: every chunk is attended as the memory defines it."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.counts.seen

    @property
    def seen_tokens(self) -> int:
        """Tokens of the stream consumed so far."""
        return self.counts.seen

    @property
    def cached_tokens(self) -> int:
        """Tokens a full-attention layer attends to besides new ones: sinks, window, partial block and
        the blocks it can retrieve."""
        c = self.counts
        return c.n_sink + c.window + c.partial + min(self.memory.top_k, c.blocks) * self.memory.block_size

    @property
    def max_cached_tokens(self) -> int:
        """The most tokens a full-attention layer attends to besides new ones (the accelerator's bound)."""
        return self.sink_size + self.window_size + self.memory.retrieved_tokens

    @property
    def memory_blocks(self) -> int:
        """Blocks in each full-attention layer's memory."""
        return self.counts.blocks

    def retrieved(self) -> dict[int, list[int]]:
        """The blocks each full-attention layer attended to in the last forward."""
        return {i: list(layer.retrieved) for i, layer in enumerate(self.layers) if not layer.is_sliding}

    def accelerator_tensors(self) -> list[torch.Tensor]:
        """The tensors held on the model's device between forwards: sinks, windows, partial blocks, and
        the copies of the last retrieved blocks (at most ``top_k`` per layer)."""
        out = [t for layer in self.layers for f in (layer.sinks, layer.window, layer.partial)
               for t in (f.k, f.v, f.s) if t is not None]
        return out + [t for layer in self.layers if layer.fetched is not None for t in layer.fetched[1:]]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds in memory: the accelerator's and the blocks in the store (for
        memory accounting: :func:`streamingllm.memory.storage_bytes`)."""
        out = self.accelerator_tensors()
        for layer in self.layers:
            if layer.store is not None:
                out += [t for t in layer.store.keys + layer.store.values if t is not None]
                out += [layer.store.summaries] if len(layer.store) else []
        return out

    def store_bytes(self) -> tuple[int, int]:
        """(bytes in memory, bytes spilled to disk) of every layer's blocks."""
        stores = [layer.store for layer in self.layers if layer.store is not None]
        return sum(s.resident_bytes() for s in stores), sum(s.spilled_bytes() for s in stores)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.counts = self.before = Counts()
        self.frame = (0, 0)
        self.forwards, self._next_layer = -1, 0

    def close(self) -> None:
        """Remove the spilled blocks' files."""
        for layer in self.layers:
            if layer.store is not None:
                layer.store.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # --- saved state --------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"family": self.family.name, "num_layers": self.num_layers, "sink_size": self.sink_size,
                "window_size": self.window_size, "policies": list(self.layer_policies),
                "memory": [self.memory.block_size, self.memory.top_k, self.memory.repr_keys, self.memory.chunk_size,
                           self.memory.lookup_every]}

    def state_dict(self) -> dict:
        """Everything needed to continue the stream exactly elsewhere (``torch.save`` it), blocks included."""
        c = self.counts
        return {"kind": "memory", **self._identity(), "counts": (c.seen, c.n_sink, c.window, c.partial, c.blocks),
                "layers": [layer.state() for layer in self.layers]}

    def load_state_dict(self, state: dict) -> None:
        """Continue a stream :meth:`state_dict` saved; ValueError when it is for another cache."""
        mine = self._identity()
        theirs = {k: state.get(k) for k in mine}
        if state.get("kind") != "memory" or theirs != mine:
            raise ValueError(f"MemoryCache.load_state_dict: the state is for {theirs}, this cache is {mine}")
        self.reset()
        for layer, saved in zip(self.layers, state["layers"]):
            layer.restore(saved)
        self.counts = Counts(*state["counts"])
