"""streamingllm: endless text streams with constant memory for Hugging Face causal LMs.

Implements StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention
Sinks", ICLR 2024) as an exact transformers 5 cache. This package's top level is the core and
needs torch and transformers only; evaluations (:mod:`streamingllm.evals`), benchmarks
(:mod:`streamingllm.bench`), the server (:mod:`streamingllm.serve`) and the command line
(:mod:`streamingllm.cli`) sit on top.
"""

from importlib import metadata as _metadata

from . import sink_llama  # registers the sink_llama architecture with transformers' Auto classes
from .cache import BlockMemory, MemoryCache, SinkCache
from .families import UnsupportedModelError, supported_families
from .timeline import ApproximateChunkError
from .feed import Sampling, decode_rows, generate, generate_tokens, iter_chunks, prefill
from .models import load
from .session import Session

__all__ = [
    "SinkCache",
    "UnsupportedModelError",
    "ApproximateChunkError",
    "supported_families",
    "Sampling",
    "generate",
    "generate_tokens",
    "prefill",
    "iter_chunks",
    "decode_rows",
    "load",
    "Session",
    "MemoryCache",
    "BlockMemory",
    "Conversation",
    "RemoteSession",
]

#: Names imported when first used: the HTTP client pulls in urllib.request, which local use never needs.
_LAZY = {"Conversation": "client", "RemoteSession": "client"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


try:
    __version__ = _metadata.version("streamingllm")
except _metadata.PackageNotFoundError:  # run from a source tree without installing
    __version__ = "0+unknown"
