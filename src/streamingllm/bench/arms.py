"""The arms of the decode benchmark and the forward passes they (and the streams) time.

* ``streaming``: a full, evicting :class:`~streamingllm.cache.SinkCache` of N tokens (``compiled``:
  each step prepared by :meth:`SinkCache.prepare_decode_step` and run by the compiled
  :class:`~streamingllm.compiled.DecodeStep`);
* ``dense``: transformers' ``DynamicCache`` holding exactly N tokens (cropped back after each step);
* ``dense-compiled``: transformers' ``StaticCache`` holding N tokens, its forward compiled the way
  the streaming step is (transformers' fastest dense decoding, what ``generate()`` does with a
  static cache); the new token's slot is given back after each step;
* ``recompute``: :class:`~streamingllm.baselines.RecomputeWindow` over the last N tokens;
* ``llama.cpp``: :class:`~streamingllm.bench.llamacpp.LlamaCppArm`, the same GGUF at its own
  precision through llama-cpp-python, N tokens in its KV cache.
"""

from __future__ import annotations

import torch

from ..baselines import RecomputeWindow
from ..cache import SinkCache
from ..compat import cache_argument, new_dense_cache
from ..compiled import DecodeStep, compile_kwargs, compiling
from ..feed import prefill
from .schedule import timed

FILL_CHUNK = 256  # tokens per forward when filling caches (untimed)


class Forward:
    """Cached forward passes of ``model``, the cache argument looked up once (not per timed step).

    With ``compile``, :meth:`step` runs the steps a :class:`SinkCache` can prepare (full, RoPE)
    through the compiled :class:`~streamingllm.compiled.DecodeStep`: static shapes, compiled once.
    """

    def __init__(self, model, compile: bool = False):
        self.model, self.device = model, model.device
        self.cache_kw = cache_argument(model)
        self.decode = DecodeStep(model, "on") if compile else None

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, T, vocab) of ``ids`` (B, T) run through ``cache``: an ordinary forward."""
        return self.model(input_ids=ids, use_cache=True, **{self.cache_kw: cache}).logits

    def step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """A single-token step: prepared and compiled where possible, else ordinary."""
        return self(ids, cache) if self.decode is None else self.decode(ids, cache)

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
        return timed(fn, *args, sync=self.sync)


def held_tokens(cache) -> int:
    """Tokens whose keys and values ``cache`` holds now."""
    return cache.cached_tokens if isinstance(cache, SinkCache) else int(cache.get_seq_length())


class Arm:
    """One arm at one cache size ``n``: :meth:`step` is timed, :meth:`after` is not.

    ``state`` is the arm's cache (None for re-computation, which keeps no keys or values).
    """

    def __init__(self, method: str, fwd: Forward, n: int, ids: torch.Tensor, sink_size: int, last_only: bool,
                 gguf=None):
        self.method, self.fwd, self.n, self.state = method, fwd, n, None
        if method == "recompute":
            self.window = RecomputeWindow(fwd.model, n, ids, last_only=last_only)
            return
        if method == "llama.cpp":
            from .llamacpp import LlamaCppArm

            self.llama = LlamaCppArm(gguf, n, ids[0, :n].tolist())
            return
        if method == "dense":
            self.state, ids = new_dense_cache(fwd.model), ids[:, :n]
        elif method == "dense-compiled":
            from transformers import StaticCache

            self.state, ids = StaticCache(config=fwd.model.config, max_cache_len=n + 1), ids[:, :n]
            self.position = torch.full((1, 1), n, dtype=torch.long, device=ids.device)
            self.compiled = torch.compile(fwd.model.forward, **compile_kwargs(fwd.device))
        else:  # fed past its capacity, so it is full and evicting when timed
            self.state = SinkCache(fwd.model, sink_size=sink_size, window_size=n - sink_size)
        fwd.feed(self.state, ids)
        if method == "dense" and hasattr(self.state, "activate_past_recording"):
            self.state.activate_past_recording()  # sliding-window layers (hybrid models) can then give a step back
        self.check_held()

    def step(self, tok: torch.Tensor) -> None:
        if self.method == "recompute":
            self.window.step(tok)
        elif self.method == "llama.cpp":
            self.llama.step(int(tok.reshape(-1)[0]))
        elif self.method == "streaming-compiled":
            self.fwd.step(tok, self.state)
        elif self.method == "dense-compiled":
            with compiling(self.fwd.device):
                self.compiled(input_ids=tok, position_ids=self.position, use_cache=True,
                              **{self.fwd.cache_kw: self.state})
        else:
            self.fwd(tok, self.state)

    def after(self) -> None:
        """Outside the timed region: give back the slot the step took (dense arms hold n tokens)."""
        if self.method == "dense":
            self.state.crop(-1)
        elif self.method == "dense-compiled":
            for layer in self.state.layers:
                layer.cumulative_length.fill_(self.n)
        elif self.method == "llama.cpp":
            self.llama.rewind()

    def check_held(self) -> None:
        """Raise unless the arm holds exactly ``n`` tokens (every timed step sees the same cache)."""
        held = self.llama.held if self.method == "llama.cpp" else self.n if self.state is None else held_tokens(self.state)
        if held != self.n:
            raise RuntimeError(f"{self.method} arm holds {held} tokens, expected {self.n}")
