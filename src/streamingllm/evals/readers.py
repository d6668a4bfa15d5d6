"""Readers: a model reading an endless stream under one method, and answering questions in it.

A reader consumes token ids (:meth:`Reader.feed`) and answers (:meth:`Reader.answer`: feed the
question, then generate greedily; the answer becomes part of the stream, as it would for a
user). One class per way of holding the past, at the same cache of ``L`` tokens:

* :class:`CachedReader` ``dense``: a DynamicCache keeps every token (stops past ``max_tokens``);
* :class:`CachedReader` ``window`` / ``streaming``: a SinkCache without / with sinks, fed in
  exact chunks (:func:`streamingllm.feed.iter_chunks`, as the perplexity evaluation does);
  ``memory``: a MemoryCache (streaming plus a memory of the evicted blocks), the same way;
* :class:`RecomputeReader` ``recompute``: the last ``L`` tokens re-read for every answer token.

The recall evaluations (:mod:`.passkey`, :mod:`.streameval`) take any object with these two
methods, so the tests can plug in an oracle that sees exactly the tokens a cache would hold.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from ..baselines import recompute_forward
from ..compat import cache_kwargs, new_dense_cache
from ..feed import iter_chunks
from .perplexity import Setting

StopRule = Callable[[list[int]], bool]  # the answer so far (token ids) -> it is complete


class TokenBudgetExceeded(RuntimeError):
    """A dense reader was asked to hold more than its ``max_tokens``."""


class Reader(Protocol):
    tokens: int  # tokens read so far (the stream's length)

    def feed(self, ids: Sequence[int]) -> None: ...

    def answer(self, question: Sequence[int], max_new_tokens: int, stop: StopRule) -> list[int]: ...


class CachedReader:
    """``dense``, ``window``, ``streaming`` or ``memory`` (see :class:`~streamingllm.evals.perplexity.Setting`).

    Args:
        model: a causal LM.
        setting: the method and its cache sizes (tokens).
        chunk_size: tokens per forward when reading (>= 1).
        max_tokens: ``dense`` only: the most tokens it may hold (None: no limit); past it, or
            when the device's memory runs out, :class:`TokenBudgetExceeded`.
    """

    def __init__(self, model, setting: Setting, chunk_size: int = 256, max_tokens: int | None = None):
        if setting.method not in ("dense", "window", "streaming", "memory"):
            raise ValueError(f"CachedReader reads with dense, window, streaming or memory, not {setting.method!r}")
        self.model, self.setting, self.chunk_size, self.max_tokens = model, setting, chunk_size, max_tokens
        self.dense = setting.method == "dense"
        self.cache = new_dense_cache(model) if self.dense else setting.build_cache(model)
        self.tokens = 0
        self.logits: torch.Tensor | None = None  # the last token's, predicting the next

    @torch.no_grad()
    def feed(self, ids: Sequence[int]) -> None:
        ids = torch.as_tensor(list(ids), dtype=torch.long, device=self.model.device)
        if not len(ids):
            return
        if self.dense:
            if self.max_tokens is not None and self.tokens + len(ids) > self.max_tokens:
                raise TokenBudgetExceeded(f"dense would hold {self.tokens + len(ids)} tokens > {self.max_tokens}")
            try:
                for start in range(0, len(ids), self.chunk_size):
                    piece = ids[start : start + self.chunk_size]
                    self.logits = self.model(input_ids=piece[None], use_cache=True,
                                             **cache_kwargs(self.model, self.cache)).logits[0, -1]
            except torch.OutOfMemoryError as err:  # dense stops where its memory runs out
                self.cache = None
                raise TokenBudgetExceeded(f"dense ran out of memory at {self.tokens} tokens") from err
        else:
            for _, logits in iter_chunks(self.model, self.cache, ids[None], chunk_size=self.chunk_size):
                self.logits = logits[0, -1]
        self.tokens += len(ids)

    def answer(self, question: Sequence[int], max_new_tokens: int, stop: StopRule) -> list[int]:
        self.feed(question)
        out: list[int] = []
        while len(out) < max_new_tokens:
            out.append(int(self.logits.argmax()))
            self.feed(out[-1:])  # the answer is part of the stream
            if stop(out):
                break
        return out


class RecomputeReader:
    """``recompute``: every answer token is computed by a fresh forward over the last ``context``
    tokens of the stream (positions 0 .. context - 1); reading costs nothing else.

    Args:
        model: a causal LM.
        context: tokens each forward sees (the cache size L, >= 1).
    """

    def __init__(self, model, context: int):
        self.model, self.context = model, context
        self.recent: deque[int] = deque(maxlen=context)
        self.tokens = 0

    def feed(self, ids: Sequence[int]) -> None:
        self.recent.extend(int(i) for i in ids)
        self.tokens += len(ids)

    def answer(self, question: Sequence[int], max_new_tokens: int, stop: StopRule) -> list[int]:
        self.feed(question)
        out: list[int] = []
        while len(out) < max_new_tokens:
            window = torch.tensor([list(self.recent)], dtype=torch.long, device=self.model.device)
            out.append(int(recompute_forward(self.model, window)[0].argmax()))
            self.feed(out[-1:])
            if stop(out):
                break
        return out


def make_reader(model, setting: Setting, chunk_size: int = 256, max_dense_tokens: int | None = None) -> Reader:
    """The reader for ``setting`` (see the module docstring)."""
    if setting.method == "recompute":
        return RecomputeReader(model, setting.window_size)
    return CachedReader(model, setting, chunk_size, max_dense_tokens if setting.method == "dense" else None)
