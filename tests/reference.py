"""The slow, obviously correct StreamingLLM reference the fast cache is tested against.

It keeps every cached key *before* RoPE, keeps the first S and the last W of them by plain
concatenation and slicing, and at every step rotates the whole kept cache (plus the new
tokens) to positions 0..n with angles computed in float64. Nothing is ever rotated twice.
The model is fed no position ids, so it puts the query at ``get_seq_length()``, which here
is the in-cache position of the global layers. ALiBi models need no rotation at all.

Hybrid models, extended the same way: each layer by its attention type (``config.layer_types``;
every layer slides when a model has a ``sliding_window`` and no list). A sliding layer keeps the
last ``sliding_window - 1`` keys before RoPE, no sinks, and rotates them at every step to their
true distance from the query, whose position the model chose (the global layers' in-cache one),
each type with its own RoPE frequencies. A model whose layers all slide over more than S + W
tokens is streamed with sinks in every layer (its own mask never reaches past the cache).

Negative controls (``sliding=``): ``"sinks"`` gives the sliding layers sinks + window like the
global ones; ``"in_cache_frame"`` puts their keys at positions ``0 .. held`` (their own in-cache
positions) instead of at their distance from the query.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from streamingllm.families import family_of, rope_inv_freq

FULL, SLIDING = "full_attention", "sliding_attention"


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) to ``positions`` (T,), rotate_half layout on the first 2*len(inv_freq) dims."""
    half = inv_freq.numel()
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def _query_positions(kwargs: dict, n: int, q: int) -> torch.Tensor:
    """The positions (q,) the model gave the new tokens: from the position ids it passed to the
    cache, else ``n .. n + q - 1`` (it took them from ``get_seq_length()``)."""
    inner = kwargs.get("kwargs", kwargs)
    pos = inner.get("position_ids") if isinstance(inner, dict) else None
    return torch.arange(n, n + q) if pos is None else pos.reshape(-1, q)[0].cpu()


class ReferenceLayer(DynamicLayer):
    """Sinks + window, re-positioned at 0 .. n at every step."""

    def __init__(self, sink_size: int, window_size: int, inv_freq: torch.Tensor | None):
        super().__init__()
        self.sink_size, self.window_size, self.inv_freq = sink_size, window_size, inv_freq

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = self.get_seq_length(), key_states.shape[-2]
        if self.inv_freq is not None:  # undo the model's rotation
            key_states = _rotate(key_states, -_query_positions(kwargs, n, q), self.inv_freq)
        raw_keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        keys = raw_keys
        if self.inv_freq is not None:
            keys = _rotate(raw_keys, torch.arange(n + q), self.inv_freq)
        # keep the first S and the last W tokens for the next step
        S, W = self.sink_size, self.window_size
        if raw_keys.shape[-2] > S + W:
            keep = lambda t: torch.cat([t[:, :, :S], t[:, :, t.shape[-2] - W :]], dim=-2)
            self.keys, self.values = keep(raw_keys), keep(values)
        else:
            self.keys, self.values = raw_keys, values
        return keys, values


class ReferenceSlidingLayer(DynamicLayer):
    """The model's own window: the last ``window - 1`` keys, at their distance from the query."""

    is_sliding = True

    def __init__(self, window: int, inv_freq: torch.Tensor, in_cache_frame: bool = False):
        super().__init__()
        self.window, self.inv_freq, self.in_cache_frame = window, inv_freq, in_cache_frame

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        m, q = self.get_seq_length(), key_states.shape[-2]
        positions = _query_positions(kwargs, m, q)
        raw_keys = torch.cat([self.keys, _rotate(key_states, -positions, self.inv_freq)], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        first = 0 if self.in_cache_frame else int(positions[0]) - m  # the oldest kept key's position
        keys = _rotate(raw_keys, torch.arange(first, first + m + q), self.inv_freq)
        keep = self.window - 1
        self.keys, self.values = raw_keys[:, :, -keep:], values[:, :, -keep:]
        return keys, values


def reference_layer_types(config, sink_size: int, window_size: int) -> list[str]:
    """Each layer's type as the reference streams it (see the module docstring)."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = list(getattr(config, "layer_types", None) or [SLIDING if window else FULL] * n)
    if window is None or (FULL not in types and sink_size + window_size < window):
        return [FULL] * n
    return types


class ReferenceSinkCache(Cache):
    """Args: model, sink_size, window_size as for the fast cache; ``sliding``: ``"native"``, or a
    negative control (``"sinks"``, ``"in_cache_frame"``)."""

    def __init__(self, model, sink_size: int, window_size: int, sliding: str = "native"):
        family = family_of(model.config)
        rope = family.positions == "rope"
        types = reference_layer_types(model.config, sink_size, window_size)
        layers = []
        for t in types:
            inv_freq = rope_inv_freq(model, t) if rope else None
            if t == FULL or sliding == "sinks":
                layers.append(ReferenceLayer(sink_size, window_size, inv_freq))
            else:
                layers.append(ReferenceSlidingLayer(model.config.sliding_window, inv_freq, sliding == "in_cache_frame"))
        self.primary = types.index(FULL) if FULL in types else 0
        super().__init__(layers=layers)

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        """The global layers' held tokens (where the model puts the query), or ``layer_idx``'s."""
        return self.layers[self.primary if layer_idx is None else layer_idx].get_seq_length()

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()
