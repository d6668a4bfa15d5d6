"""Sink-aware attention: transformers' own attention, made exact for chunks that overflow the window.

A forward of several tokens into a full sink cache (a new turn of a conversation through
``model.generate``) is exact only if every token sees the sinks and its *own* last
``window_size`` tokens: a banded mask, with one copy of the sinks per in-cache position the
chunk's queries need them at (:class:`~streamingllm.timeline.ConcatStep`). The model builds a
plain causal mask, so the cache cannot ask for that band through the mask.

It goes through transformers' attention interface instead: this module registers
``streamingllm_sdpa`` and ``streamingllm_eager``, which are the model's own ``sdpa`` and ``eager``
attention, except that when the keys a cache returned carry a band (:func:`attach_band`), the
band replaces the model's mask. :func:`use_sink_attention` switches a model to the variant of
the implementation it already uses (``model.set_attn_implementation``); a
:class:`~streamingllm.cache.SinkCache` built from a model does that itself.
"""

from __future__ import annotations

import sys

import torch

SINK_ATTENTION = {"sdpa": "streamingllm_sdpa", "eager": "streamingllm_eager"}
#: Implementations that honour bands themselves, beyond :data:`SINK_ATTENTION`'s variants
#: (the softmax-sink attention of :mod:`streamingllm.sink_llama` adds its own on import).
BAND_AWARE: set[str] = set(SINK_ATTENTION.values())
#: Implementations that return attention probabilities (what :mod:`streamingllm.evals.attention` reads).
RETURNS_PROBABILITIES: set[str] = {"eager", SINK_ATTENTION["eager"]}
_BAND = "_streamingllm_band"
_registered = False


def attach_band(keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mark ``keys`` (returned by a cache update) with the additive mask (1, 1, q, keys) their
    chunk must be attended with; sink-aware attention uses it instead of the model's mask."""
    setattr(keys, _BAND, mask)
    return keys


def band_of(keys: torch.Tensor) -> torch.Tensor | None:
    """The band attached to ``keys`` by :func:`attach_band`, or None."""
    return getattr(keys, _BAND, None)


def mask_for(key: torch.Tensor, attention_mask):
    """The mask a band-aware attention must use: the band attached to ``key``, else the model's."""
    band = band_of(key)
    return attention_mask if band is None else band


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask_for(key, attention_mask), **kwargs)


def _eager(module, query, key, value, attention_mask, **kwargs):
    """The model file's own ``eager_attention_forward`` (each model defines one), with the band."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__} has no eager_attention_forward; use sdpa")
    return eager(module, query, key, value, mask_for(key, attention_mask), **kwargs)


def register() -> None:
    """Register the sink-aware implementations with transformers (once)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    AttentionInterface.register(SINK_ATTENTION["sdpa"], _sdpa)
    AttentionInterface.register(SINK_ATTENTION["eager"], _eager)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SINK_ATTENTION["sdpa"], sdpa_mask)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SINK_ATTENTION["eager"], eager_mask)
    _registered = True


def attention_implementation(config) -> str | None:
    """The attention implementation a model config names (``config._attn_implementation``)."""
    return getattr(config, "_attn_implementation", None)


def is_sink_attention(config) -> bool:
    """True when the model attends through a sink-aware implementation (bands are honoured)."""
    return attention_implementation(config) in BAND_AWARE


def use_sink_attention(model) -> bool:
    """Switch ``model`` to the sink-aware variant of its attention implementation (sdpa or eager).

    Returns True when the model now uses one; False when its implementation has no sink-aware
    variant (the cache then refuses overflowing chunks instead of computing them wrongly).
    """
    impl = attention_implementation(model.config)
    if impl in BAND_AWARE:
        return True
    if impl not in SINK_ATTENTION:
        return False
    register()
    model.set_attn_implementation(SINK_ATTENTION[impl])
    return True
