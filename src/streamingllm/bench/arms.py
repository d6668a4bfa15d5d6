"""The three arms of the decode benchmark and the forward passes they (and the streams) time.

* ``streaming``: a full, evicting :class:`~streamingllm.cache.SinkCache` of N tokens (``compiled``:
  each step prepared by :meth:`SinkCache.prepare_decode_step` and run through ``torch.compile``);
* ``dense``: transformers' ``DynamicCache`` holding exactly N tokens (cropped back after each step);
* ``recompute``: :class:`~streamingllm.baselines.RecomputeWindow` over the last N tokens.
"""

from __future__ import annotations

import time

import torch

from ..baselines import RecomputeWindow
from ..cache import SinkCache
from ..compat import cache_argument, new_dense_cache
from ..feed import prefill

FILL_CHUNK = 256  # tokens per forward when filling caches (untimed)


class Forward:
    """Cached forward passes of ``model``, the cache argument looked up once (not per timed step).

    With ``compile``, :meth:`step` runs the steps a :class:`SinkCache` can prepare (full, RoPE)
    through ``torch.compile(model.forward, dynamic=False)``: static shapes, compiled once.
    """

    def __init__(self, model, compile: bool = False):
        self.model, self.device = model, model.device
        self.cache_kw = cache_argument(model)
        self.compiled = torch.compile(model.forward, dynamic=False) if compile else None

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, T, vocab) of ``ids`` (B, T) run through ``cache``: an ordinary forward."""
        return self.model(input_ids=ids, use_cache=True, **{self.cache_kw: cache}).logits

    def step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """A single-token step: prepared and compiled where possible, else ordinary."""
        pos = cache.prepare_decode_step() if self.compiled is not None and isinstance(cache, SinkCache) else None
        if pos is None:
            return self(ids, cache)
        return self.compiled(input_ids=ids, position_ids=pos, use_cache=True, **{self.cache_kw: cache}).logits

    def feed(self, cache, ids: torch.Tensor, chunk_size: int = FILL_CHUNK) -> torch.Tensor:
        """Stream ``ids`` (B, T) into ``cache`` in chunks (a SinkCache exactly, by :func:`prefill`);
        returns the last token's logits (B, vocab)."""
        if isinstance(cache, SinkCache):
            return prefill(self.model, cache, ids, chunk_size=chunk_size, exact=True)
        for done in range(0, ids.shape[1], chunk_size):
            logits = self(ids[:, done : done + chunk_size], cache)[:, -1]
        return logits

    def sync(self) -> None:
        """Wait for the device (CUDA), so wall-clock time covers the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn, *args) -> float:
        """Run ``fn(*args)``; returns its wall-clock seconds, the device synchronised before and after."""
        self.sync()
        t0 = time.perf_counter()
        fn(*args)
        self.sync()
        return time.perf_counter() - t0


def held_tokens(cache) -> int:
    """Tokens whose keys and values ``cache`` holds now."""
    return cache.cached_tokens if isinstance(cache, SinkCache) else int(cache.get_seq_length())


class Arm:
    """One arm at one cache size ``n``: :meth:`step` is timed, :meth:`after` is not.

    ``state`` is the arm's cache (None for re-computation, which keeps no keys or values).
    """

    def __init__(self, method: str, fwd: Forward, n: int, ids: torch.Tensor, sink_size: int, last_only: bool):
        self.method, self.fwd, self.n, self.state = method, fwd, n, None
        if method == "recompute":
            self.window = RecomputeWindow(fwd.model, n, ids, last_only=last_only)
            return
        if method == "dense":
            self.state, ids = new_dense_cache(fwd.model), ids[:, :n]
        else:  # fed past its capacity, so it is full and evicting when timed
            self.state = SinkCache(fwd.model, sink_size=sink_size, window_size=n - sink_size)
        fwd.feed(self.state, ids)
        self.check_held()

    def step(self, tok: torch.Tensor) -> None:
        if self.method == "recompute":
            self.window.step(tok)
        elif self.method == "streaming-compiled":
            self.fwd.step(tok, self.state)
        else:
            self.fwd(tok, self.state)

    def after(self) -> None:
        if self.method == "dense":
            self.state.crop(-1)  # back to n tokens, outside the timed region

    def check_held(self) -> None:
        """Raise unless the arm holds exactly ``n`` tokens (every timed step sees the same cache)."""
        held = self.n if self.state is None else held_tokens(self.state)
        if held != self.n:
            raise RuntimeError(f"{self.method} arm holds {held} tokens, expected {self.n}")
