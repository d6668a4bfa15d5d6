"""Batches of independent streams: every row streams exactly as it would alone.

* **Left-padded batches** (:class:`PaddedRows`): the rows have different lengths, so each keeps other
  tokens and evicts at other times. Each row gets a cache of its own (batch 1), fed only that row's
  real tokens: in each forward, row ``r``'s real tokens are its last ``k_r`` columns, found from the
  position ids the model passes to the cache (transformers computes them per row from the attention
  mask: pads get 0, real tokens ``0, 1, 2, ...``). A :class:`~streamingllm.cache.SinkCache` that
  receives such a batch hands it to one of these.
* **Stacked streams** (:class:`StackedRows`): the decode steps of a server's sessions, each with its
  own cache, length and positions, share one forward: one token per row, at the position each row's
  own cache gives (see :func:`streamingllm.feed.decode_rows`). It is a transformers ``Cache`` of its
  own, built for that one forward.

Both stack the rows' keys and values, padded to the longest, and attach the per-row mask (each row's
own causal mask or exact band, shifted to its columns; a hybrid model's sliding layers get each row's
sliding-window mask) that the sink-aware attention (:mod:`streamingllm.attention`) uses instead of the
model's. The cost is that of the rows' own caches plus one stacking copy per layer and step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..attention import attach_band, band_of
from ..compat import update_position_ids
from .masks import rows_mask


class RowStreams:
    """Feeds each row's real tokens to its own cache and stacks what the rows attend to.

    Args:
        rows: one batch-1 :class:`~streamingllm.cache.SinkCache` per row.
    """

    def __init__(self, rows: list):
        self.rows = rows
        self.columns = 0  # columns of the batch consumed (pads included): what generate() slices by
        self._new: list[int] = []  # per row: its real tokens in this forward (its last columns)
        self._positions: torch.Tensor | None = None
        self._masks: dict[tuple, torch.Tensor] = {}  # this forward's mask, per the rows' native windows

    def start(self, positions: torch.Tensor | None, new: list[int], q: int) -> None:
        """Start a forward of ``q`` columns; row ``r`` has ``new[r]`` real tokens, at ``positions[r]``."""
        self._positions, self._new, self._masks = positions, new, {}
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
        if mask is None:  # rows of one model may differ: a cache larger than an all-sliding model's window keeps it
            mask = self._masks[windows] = rows_mask(
                [t.shape[-2] for t in keys], self._new, q, bands=[band_of(t) for t in keys], windows=windows,
                dtype=keys[0].dtype, device=keys[0].device)
        longest = mask.shape[-1]
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[-2]))  # noqa: E731
        stacked = torch.cat([pad(t) for t in keys]), torch.cat([pad(t) for t in values])
        attach_band(stacked[0], mask if mask.device == key_states.device else mask.to(key_states.device))
        return stacked

    @property
    def cached_tokens(self) -> int:
        """The most tokens any row holds."""
        return max(row.cached_tokens for row in self.rows)

    def tensors(self) -> list[torch.Tensor]:
        return [t for row in self.rows for t in row.tensors()]


class PaddedRows(RowStreams):
    """The per-row streams of one left-padded batch, told apart by their position ids."""

    def begin(self, positions: torch.Tensor | None, q: int) -> None:
        """Start a forward of ``q`` columns whose position ids are ``positions`` (batch, q)."""
        if positions is None or positions.shape[0] != len(self.rows):
            raise ValueError("SinkCache: a padded batch needs the model's position ids for every row "
                             "(transformers' generate() computes them from attention_mask)")
        new = [int(positions[r, -1]) + 1 - row.seen_tokens for r, row in enumerate(self.rows)]
        bad = [r for r, k in enumerate(new) if not 1 <= k <= q]
        if bad:
            raise ValueError(
                f"SinkCache: rows {bad} of this padded batch: their position ids do not continue the tokens they "
                "consumed, or they have no real token in this forward; pass the attention_mask of the whole batch")
        self.start(positions, new, q)


class _RowsLayer(CacheLayerMixin):
    """Layer ``i`` of every stacked row, as transformers' masking code asks about it: its type
    (sliding or not) and mask sizes. The rows attend through their own, attached masks."""

    def __init__(self, is_sliding: bool):
        super().__init__()
        self.is_sliding = is_sliding

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("StackedRows: layers are updated through the cache (StackedRows.update)")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # unused: every layer attends with the rows' attached mask

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class StackedRows(Cache):
    """A cache for one forward that advances several independent streams by one token each.

    Row ``r`` of that forward is the next token of the stream ``caches[r]`` holds: it is stored in and
    attends to that cache only, exactly as a forward of its own would, at the position ids
    ``caches[r].position_ids(1)``.

    Args:
        caches: one batch-1 :class:`~streamingllm.cache.SinkCache` per stream, all for the same model,
            each able to stack (:attr:`~streamingllm.cache.SinkCache.can_stack`).
    """

    is_compileable = False

    def __init__(self, caches: list):
        if not caches:
            raise ValueError("SinkCache.stacked: give at least one cache")
        first = caches[0]
        if not all(c.can_stack and c.config is first.config for c in caches):
            raise ValueError("SinkCache.stacked: every cache must serve the same model, with sink-aware attention "
                             "(sdpa or eager; see SinkCache.can_stack), and not be a padded batch")
        super().__init__(layers=[_RowsLayer(s) for s in first.is_sliding])
        self.streams = RowStreams(list(caches))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store row ``r``'s new key/value of layer ``layer_idx`` in ``caches[r]``; return the stacked
        keys/values with the rows' mask attached."""
        if layer_idx == 0:
            if key_states.shape[-2] != 1:
                raise ValueError("SinkCache: stacked streams take one token each per forward, "
                                 f"got {key_states.shape[-2]}")
            positions = update_position_ids(kwargs)
            if positions is not None:
                positions = positions.expand(key_states.shape[0], -1)
            self.streams.start(positions, [1] * len(self.streams.rows), 1)
        return self.streams.update(key_states, value_states, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.streams.columns

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def rows(self) -> list:
        """The streams' caches, one per row."""
        return self.streams.rows
