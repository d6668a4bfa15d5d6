"""The single-token decode step, compiled where it pays.

Once a RoPE model's :class:`~streamingllm.cache.SinkCache` is full, every decode step has the same
shapes: :meth:`~streamingllm.cache.SinkCache.prepare_decode_step` does the step's bookkeeping
before the forward, and inside it each layer writes one key/value into a fixed buffer slot and
attends to the whole buffer. Such a forward compiles once per model and cache size:

* on CUDA with ``mode="reduce-overhead"``: inductor's kernels replayed as CUDA graphs, so a token
  costs no per-kernel launches and no host work (:class:`DecodeStep` is on by default there);
* on the CPU with freezing and inductor's C++ GEMM template (``max_autotune``): it pays with the
  int8 weights of :mod:`streamingllm.precision` (bfloat16), not with float32, and compiling takes
  up to a minute per cache size, so it is opt-in (``compile="on"``). Freezing makes the weights
  constants of the compiled code: a model whose weights change afterwards needs a new process.

Compiled graphs are kept with the model (an attribute) for its life (a chat's turns, a server's
requests reuse them), and inductor caches its compiled code on disk, so a second process compiles
faster. Steps that cannot be prepared (a cache not yet full, ALiBi families, several tokens) run
eagerly, and so does everything after a compilation fails (with one ``RuntimeWarning``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from .checks import check_choice
from .compat import cache_kwargs

#: The accepted values of ``compile``: ``"auto"`` compiles where it pays (CUDA).
COMPILE = ("auto", "on", "off")

_STATE = "_streamingllm_decode_step"  # the model's attribute: its compiled forward, sizes and failure


class _Compiled:
    """What a model keeps of its compiled decode step (an attribute of the model, so it lives as
    long): the compiled forward, the cache sizes it was compiled for, why it failed (or None), and
    the ``torch.compile`` that made it (another one, say a test's stand-in, compiles afresh)."""

    def __init__(self, model):
        self.compiler = torch.compile
        self.forward = torch.compile(model.forward, **compile_kwargs(model.device))
        self.sizes: set[int] = set()
        self.failure: str | None = None


def compiles(compile: str | bool, device: torch.device) -> bool:
    """Whether ``compile`` (one of :data:`COMPILE`, or a bool) means compiling on ``device``."""
    if isinstance(compile, bool):
        return compile
    compile = check_choice("compile", compile, list(COMPILE))
    return compile == "on" or (compile == "auto" and torch.device(device).type == "cuda")


def compile_kwargs(device: torch.device) -> dict:
    """``torch.compile`` arguments for a decode step on ``device`` (see the module's docstring)."""
    if torch.device(device).type == "cuda":
        return {"mode": "reduce-overhead", "dynamic": False}
    return {"dynamic": False}


def inductor_config(device: torch.device) -> dict:
    """Inductor settings a decode step on ``device`` compiles under (:func:`compiling`): on the CPU,
    freezing (weights as constants, so they can be prepacked) and the C++ GEMM template, which
    takes the place of the int8 kernel. Set around each call, not passed as ``torch.compile``
    options: freezing is read outside the scope those options apply to."""
    if torch.device(device).type == "cuda":
        return {}
    return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def compiling(device: torch.device):
    """A context in which a decode step on ``device`` compiles (and recompiles) as it should."""
    import torch._inductor.config as inductor

    return inductor.patch(**inductor_config(device))


class DecodeStep:
    """Single-token forwards of ``model`` through sink caches, compiled where possible.

    Args:
        model: a causal LM.
        compile: ``"auto"`` (compile on CUDA), ``"on"``, ``"off"`` (or a bool).
        on_compile: called with a line of text when a compilation starts and when it ends (the
            warm-up a user waits for), e.g. ``print`` to stderr; None says nothing.
    """

    def __init__(self, model, compile: str | bool = "auto", on_compile: Callable[[str], None] | None = None):
        self.model, self.on_compile = model, on_compile
        self.enabled = compiles(compile, model.device)

    @property
    def compiled(self) -> bool:
        """True when steps that can be prepared run compiled."""
        return self.enabled and self.failure is None

    @property
    def failure(self) -> str | None:
        """Why compiling the model's decode step failed (``"Type: message"``), or None."""
        state = getattr(self.model, _STATE, None)
        return None if state is None or state.compiler is not torch.compile else state.failure

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, 1, vocab) of ``ids`` (B, 1), fed into ``cache``: prepared and compiled when
        :attr:`compiled` and the cache can prepare the step, else an ordinary forward."""
        pos = cache.prepare_decode_step() if self.compiled and hasattr(cache, "prepare_decode_step") else None
        if pos is None:
            positions = cache.position_ids(1, ids.device) if hasattr(cache, "position_ids") else None
            kwargs = {} if positions is None else {"position_ids": positions}
            return self.model(input_ids=ids, use_cache=True, **kwargs, **cache_kwargs(self.model, cache)).logits
        state = getattr(self.model, _STATE, None)
        if state is None or state.compiler is not torch.compile:
            state = _Compiled(self.model)
            object.__setattr__(self.model, _STATE, state)  # not a submodule or parameter
        size = cache.max_cached_tokens
        first = size not in state.sizes
        if first and self.on_compile is not None:
            self.on_compile(f"compiling the decode step for a {size}-token cache (once per model and cache size)...")
        t0 = time.perf_counter()
        try:
            with compiling(self.model.device):
                logits = state.forward(input_ids=ids, position_ids=pos, use_cache=True,
                                       **cache_kwargs(self.model, cache)).logits
        except Exception as err:  # no C++ compiler, an unsupported op, ...: eager from now on
            state.failure = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            warnings.warn(f"torch.compile of the decode step failed, decoding eagerly: {state.failure}",
                          RuntimeWarning, stacklevel=2)
            return self.model(input_ids=ids, position_ids=pos, use_cache=True,
                              **cache_kwargs(self.model, cache)).logits
        if first:
            state.sizes.add(size)
            if self.on_compile is not None:
                self.on_compile(f"decode step compiled in {time.perf_counter() - t0:.1f} s")
        return logits
