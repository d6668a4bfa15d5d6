"""Left-padded batches: every row streams exactly as it would alone.

The rows of a left-padded batch have different lengths, so each keeps other tokens and evicts at
other times. :class:`PaddedRows` gives each row a cache of its own (batch 1), fed only that row's
real tokens: in each forward, row ``r``'s real tokens are its last ``k_r`` columns, found from the
position ids the model passes to the cache (transformers computes them per row from the attention
mask: pads get 0, real tokens ``0, 1, 2, ...``). It stacks the rows' keys and values, padded to the
longest, and attaches the per-row mask (each row's own causal mask or exact band, shifted to its
columns) that the sink-aware attention (:mod:`streamingllm.attention`) uses instead of the model's
(a hybrid model's sliding layers get each row's sliding-window mask instead of its causal one).

The same machinery batches the decode steps of *independent* streams (the sessions of a server,
each with its own cache, length and positions): :meth:`PaddedRows.stacked` takes one token per
row per forward, at the position each row's own cache gives (see :func:`streamingllm.feed.decode_rows`).

The cost is that of the rows' own caches plus one stacking copy per layer and step.
"""

from __future__ import annotations

import torch

from .attention import attach_band, band_of


class PaddedRows:
    """The per-row streams of one left-padded batch.

    Args:
        rows: one cache (batch 1) per row, each a :class:`~streamingllm.cache.SinkCache`.
        stacked: the rows are independent streams, each fed exactly one token per forward at the
            position its own cache gives (:meth:`~streamingllm.cache.SinkCache.position_ids`);
            otherwise they are the rows of one left-padded batch, told apart by their position ids.
    """

    def __init__(self, rows: list, stacked: bool = False):
        self.rows, self.stacked = rows, stacked
        self.columns = 0  # columns of the batch consumed (pads included): what generate() slices by
        self._new: list[int] = []
        self._positions: torch.Tensor | None = None
        self._masks: dict[tuple, torch.Tensor] = {}  # this forward's mask, per the rows' native windows (see update)

    def begin(self, positions: torch.Tensor | None, q: int) -> None:
        """Start a forward of ``q`` columns whose position ids are ``positions`` (batch, q)."""
        if self.stacked:
            if q != 1:
                raise ValueError(f"SinkCache: stacked streams take one token each per forward, got {q}")
            self._positions, self._new, self._masks = positions, [1] * len(self.rows), {}
            return
        if positions is None or positions.shape[0] != len(self.rows):
            raise ValueError("SinkCache: a padded batch needs the model's position ids for every row "
                             "(transformers' generate() computes them from attention_mask)")
        self._positions = positions
        self._new = [int(positions[r, -1]) + 1 - row.seen_tokens for r, row in enumerate(self.rows)]
        bad = [r for r, k in enumerate(self._new) if not 1 <= k <= q]
        if bad:
            raise ValueError(
                f"SinkCache: rows {bad} of this padded batch: their position ids do not continue the tokens they "
                "consumed, or they have no real token in this forward; pass the attention_mask of the whole batch")
        self._masks = {}
        self.columns += q

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Feed each row its real columns; return the stacked keys/values (batch, heads, longest, dim)."""
        q = key_states.shape[-2]
        keys, values = [], []
        for r, (row, k) in enumerate(zip(self.rows, self._new)):
            pos = None if self._positions is None else self._positions[r : r + 1, q - k :]
            kr, vr = row.update(key_states[r : r + 1, :, q - k :], value_states[r : r + 1, :, q - k :], layer_idx,
                                position_ids=pos)
            keys.append(kr)
            values.append(vr)
        windows = tuple(row.native_window(layer_idx) for row in self.rows)  # None: a global layer
        mask = self._masks.get(windows)
        if mask is None:
            mask = self._masks[windows] = self._build_mask(keys, q, windows)
        longest = mask.shape[-1]
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[-2]))
        stacked = torch.cat([pad(t) for t in keys]), torch.cat([pad(t) for t in values])
        attach_band(stacked[0], mask if mask.device == key_states.device else mask.to(key_states.device))
        return stacked

    def _build_mask(self, keys: list[torch.Tensor], q: int, windows: tuple = ()) -> torch.Tensor:
        """(batch, 1, q, longest) additive mask: row r's own mask on its last k_r query columns and its
        own keys; its pad columns see its first key only (their outputs are never used). ``windows``:
        per row, the layer's own sliding window it keeps (tokens, the query included), or None for a
        global layer (rows of one model may differ: a cache larger than an all-sliding model's window
        keeps that window, a smaller one is global)."""
        longest = max(t.shape[-2] for t in keys)
        dtype, device = keys[0].dtype, keys[0].device
        allowed = torch.zeros((len(keys), 1, q, longest), dtype=torch.bool, device=device)
        for r, (kr, k) in enumerate(zip(keys, self._new)):
            n, window = kr.shape[-2], windows[r] if windows else None
            band = band_of(kr)
            if band is not None:  # the row's exact band for an overflowing chunk
                allowed[r, 0, q - k :, :n] = band[0, 0] == 0
            else:  # the row's causal (or sliding-window) mask, aligned to its last key
                i = torch.arange(k, device=device)[:, None]
                j = torch.arange(n, device=device)[None, :]
                allowed[r, 0, q - k :, :n] = (j <= n - k + i) & (j > n - k + i - (window or n + 1))
            allowed[r, 0, : q - k, 0] = True
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    @property
    def cached_tokens(self) -> int:
        return max(row.cached_tokens for row in self.rows)
