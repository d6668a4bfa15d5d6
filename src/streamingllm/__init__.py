"""streamingllm: endless text streams with constant memory for Hugging Face causal LMs.

Implements StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention
Sinks", ICLR 2024) as an exact transformers 5 cache.
"""

from .cache import SinkCache, SinkCacheLayer
from .families import UnsupportedModelError, supported_families
from .stream import Sampling, generate_tokens, iter_chunks, prefill

__all__ = [
    "SinkCache",
    "SinkCacheLayer",
    "UnsupportedModelError",
    "supported_families",
    "Sampling",
    "generate_tokens",
    "prefill",
    "iter_chunks",
]
__version__ = "0.1.0"
