"""Sliding window with re-computation: the paper's quality reference, shared by the evaluations
and the benchmarks.

For every new token the model is run afresh, without any cache, over the last ``T`` tokens at
positions ``0 .. T - 1``. Every token therefore sees exactly the positions it was trained on,
and each step costs a forward of ``T`` tokens (O(T^2) attention per token).
(Dense attention, the other baseline, is transformers' ``DynamicCache``:
:func:`streamingllm.compat.new_dense_cache`.)
"""

from __future__ import annotations

import torch

from .checks import check_int
from .compat import last_logits_kwargs


@torch.no_grad()
def recompute_forward(model, window_ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
    """One fresh forward over ``window_ids`` (B, T), positions 0 .. T - 1, no cache.

    Returns the last token's logits (B, vocab) with ``last_only`` (computed alone where the model
    takes ``logits_to_keep``), else every token's (B, T, vocab), as a plain forward gives them.
    """
    if last_only:
        return model(input_ids=window_ids, use_cache=False, **last_logits_kwargs(model)).logits[:, -1]
    return model(input_ids=window_ids, use_cache=False).logits


class RecomputeWindow:
    """A rolling window of the last ``size`` token ids, re-computed in full for every new token.

    The ids live in a preallocated buffer of ``2 * size`` slots, slid back to the front once every
    ``size`` tokens, so a step allocates nothing but the forward's own tensors.

    Args:
        model: a causal LM.
        size: tokens each forward covers, the new token included (>= 1).
        history: (B, T) ids that came before; their last ``size - 1`` start the window.
        last_only: each step computes the last token's logits only (else all, as a plain forward).
    """

    def __init__(self, model, size: int, history: torch.Tensor, last_only: bool = True):
        self.model, self.size, self.last_only = model, check_int("size", size, 1), last_only
        keep = min(size - 1, history.shape[1])
        self.buf = torch.empty((history.shape[0], 2 * size), dtype=torch.long, device=history.device)
        self.buf[:, :keep] = history[:, history.shape[1] - keep :]
        self.end = keep  # ids in use: buf[:, max(0, end - size + 1) : end]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append ``token`` (B,) or (B, 1) and return the window's forward logits (see ``last_only``)."""
        n = self.size
        if self.end == 2 * n:
            self.buf[:, : n - 1] = self.buf[:, n + 1 :].clone()
            self.end = n - 1
        self.buf[:, self.end] = token.reshape(-1)
        self.end += 1
        return recompute_forward(self.model, self.buf[:, max(0, self.end - n) : self.end], self.last_only)
