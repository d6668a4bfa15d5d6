"""Attention masks the cache builds, as pure functions of counts (no cache, no model).

All masks are additive: 0 where a query may attend, the dtype's most negative value elsewhere.

* :func:`exact_band` -- a chunk that overflows the window, exactly as streaming its tokens one by
  one: each query sees the sinks and its own last ``W`` tokens.
* :func:`sliding_band` -- a hybrid model's sliding layers: each query sees its own last ``window``
  tokens of what those layers hold.
* :func:`rows_mask` -- the rows of a stacked or left-padded batch, each with its own mask.
"""

from __future__ import annotations

import torch


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of a boolean ``allowed`` tensor: 0 where True, the most negative value else."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def exact_band(sink_size: int, window_size: int, n_sink: int, window: int, q: int, *, sink_scores: bool,
               dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The exact band (1, 1, q, keys) of ``q`` new tokens into a global layer holding ``n_sink`` sinks
    and ``window`` window tokens, with ``sink_size`` (S) sinks and ``window_size`` (W) window kept.

    Query ``i`` is stream token ``at = n_sink + window + i`` (counted among the tokens held, sinks
    first). It sees the sinks up to itself and the tokens ``at - W .. at`` that are not sinks. The
    keys are laid out as the layer's exact :class:`~streamingllm.timeline.ConcatStep` gives them:

    * ``sink_scores``: one zero-key copy of the ``S`` sinks (the attention adds each query's sink
      logits), then the stored window and the new tokens;
    * else one copy of the sinks per group of queries, a group being how far the query's own window
      has overflowed (``max(0, at - S - W)``), then the stored window and the new tokens.
    """
    S, W, length = sink_size, window_size, n_sink + window
    arange = lambda *a: torch.arange(*a, device=device)  # noqa: E731
    at = length + arange(q)[:, None]  # each query's index in the stream held (sinks first)
    if sink_scores:
        sink_ok = arange(S)[None, :] <= at  # a sink sees the sinks up to itself
    else:
        group = (at - S - W).clamp(min=0)
        copies = arange((length + q - S - W) * S)[None, :]
        sink_ok = (copies // max(S, 1) == group) & (copies % max(S, 1) <= at)
    # then the stored window and the new tokens, by stream index; sinks among them are seen through the copies
    held = torch.cat((arange(n_sink, n_sink + window), arange(length, length + q)))[None, :]
    recent_ok = (held >= S) & (held <= at) & (held >= at - W)
    return additive(torch.cat((sink_ok, recent_ok), dim=1), dtype)[None, None]


def sliding_band(held: int, window: int, q: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The sliding-window mask (1, 1, q, held + q) of ``q`` new tokens into a layer holding ``held``
    tokens: each query sees its own last ``window`` tokens (itself included)."""
    at = held + torch.arange(q, device=device)[:, None]  # each query's index among what the layer holds
    keys = torch.arange(held + q, device=device)[None, :]
    return additive((keys <= at) & (keys > at - window), dtype)[None, None]


def rows_mask(lengths: list[int], new: list[int], q: int, *, bands: list[torch.Tensor | None] | None = None,
              windows: tuple[int | None, ...] | None = None, dtype: torch.dtype = torch.float32,
              device=None) -> torch.Tensor:
    """(rows, 1, q, longest) mask of a batch whose row ``r`` attends to its own ``lengths[r]`` keys
    (its new tokens last) with its ``new[r]`` real tokens in the last query columns.

    A row's real queries get its exact band where ``bands[r]`` is given (1, 1, new[r], lengths[r]),
    else its causal mask aligned to its last key, limited to its last ``windows[r]`` keys where that
    is given (a sliding layer). Its pad columns see its first key only (their outputs are never used).
    """
    longest = max(lengths)
    allowed = torch.zeros((len(lengths), 1, q, longest), dtype=torch.bool, device=device)
    for r, (n, k) in enumerate(zip(lengths, new)):
        band = bands[r] if bands else None
        window = windows[r] if windows else None
        if band is not None:
            allowed[r, 0, q - k :, :n] = band[0, 0] == 0
        else:
            i = torch.arange(k, device=device)[:, None]
            j = torch.arange(n, device=device)[None, :]
            allowed[r, 0, q - k :, :n] = (j <= n - k + i) & (j > n - k + i - (window or n + 1))
        allowed[r, 0, : q - k, 0] = True
    return additive(allowed, dtype)
