"""The slow, obviously correct StreamingLLM reference the fast cache is tested against.

It keeps every cached key *before* RoPE, keeps the first S and the last W of them by plain
concatenation and slicing, and at every step rotates the whole kept cache (plus the new
tokens) to positions 0..n with angles computed in float64. Nothing is ever rotated twice.
The model is fed no position ids, so it puts the query at ``get_seq_length()``, which here
is the in-cache position. ALiBi models need no rotation at all.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from streamingllm.families import family_of, rope_inv_freq


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) to ``positions`` (T,), rotate_half layout on the first 2*len(inv_freq) dims."""
    half = inv_freq.numel()
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


class ReferenceLayer(DynamicLayer):
    def __init__(self, sink_size: int, window_size: int, inv_freq: torch.Tensor | None):
        super().__init__()
        self.sink_size, self.window_size, self.inv_freq = sink_size, window_size, inv_freq

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = self.get_seq_length(), key_states.shape[-2]
        if self.inv_freq is not None:  # undo the model's rotation at positions n .. n+q-1
            key_states = _rotate(key_states, -torch.arange(n, n + q), self.inv_freq)
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


class ReferenceSinkCache(Cache):
    def __init__(self, model, sink_size: int, window_size: int):
        family = family_of(model.config)
        inv_freq = rope_inv_freq(model) if family.positions == "rope" else None
        layers = [ReferenceLayer(sink_size, window_size, inv_freq) for _ in range(model.config.num_hidden_layers)]
        super().__init__(layers=layers)
