"""The llama.cpp arm of the decode benchmark: the same GGUF, at its own precision, through
llama-cpp-python (the optional extra ``streamingllm[llamacpp]``).

llama.cpp is what people run small models with on a CPU, so it is the speed to compare against.
The arm holds N tokens in llama.cpp's KV cache before each timed step, like the dense arm: a step
evaluates one token (N + 1 keys), and :meth:`LlamaCppArm.rewind` removes it again, untimed. It uses
torch's CPU thread count, so both sides use the same cores.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..extras import require


def gguf_of(model_name: str) -> Path | None:
    """The GGUF file a model name loads from (the default model's wheel, or a ``.gguf`` path), or
    None for transformers folders and hub ids (no llama.cpp arm for them)."""
    from ..models import resolve

    folder, gguf = resolve(model_name)
    return None if gguf is None else Path(folder) / gguf


def available() -> bool:
    """True when llama-cpp-python can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppArm:
    """A llama.cpp context over ``path`` holding ``len(history)`` tokens.

    Args:
        path: the GGUF file.
        n: tokens held before each step (the cache size N).
        history: the N token ids it is filled with.
        threads: CPU threads (default: torch's).
    """

    def __init__(self, path: str | Path, n: int, history: list[int], threads: int | None = None):
        llama_cpp = require("llama_cpp", "the llama.cpp arm of the benchmark")
        threads = threads or torch.get_num_threads()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n + 16, n_batch=256, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.n = n
        self.llm.eval(history[:n])

    @property
    def held(self) -> int:
        """Tokens in llama.cpp's KV cache now."""
        return self.llm.n_tokens

    def step(self, token: int) -> None:
        """Evaluate one token after the N held (its logits are computed, as in the other arms)."""
        self.llm.eval([token])

    def rewind(self) -> None:
        """Drop the token the step added, so the next step sees N tokens again."""
        ctx = self.llm._ctx
        remove = getattr(ctx, "memory_seq_rm", None) or ctx.kv_cache_seq_rm
        remove(0, self.n, -1)
        self.llm.n_tokens = self.n
