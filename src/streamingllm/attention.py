"""Sink-aware attention: transformers' own attention, made exact for chunks that overflow the window.

A forward of several tokens into a full sink cache (a new turn of a conversation through
``model.generate``) is exact only if every token sees the sinks and its *own* last
``window_size`` tokens: a banded mask, with the sinks at the in-cache positions *each* query
needs them at (:class:`~streamingllm.timeline.ConcatStep`). The model builds a plain causal
mask, so the cache cannot ask for that band through the mask.

It goes through transformers' attention interface instead: this module registers
``streamingllm_sdpa`` and ``streamingllm_eager``, which are the model's own ``sdpa`` and ``eager``
attention, except that when the keys a cache returned carry a band (:func:`attach_band`), the
band replaces the model's mask. :func:`use_sink_attention` switches a model to the variant of
the implementation it already uses (``model.set_attn_implementation``); a
:class:`~streamingllm.cache.SinkCache` built from a model does that itself.

The sinks' positions differ from query to query in such a chunk. Rather than one rotated copy of
the sink keys per query (which doubles the keys of a 256-token chunk into a 1024-token cache),
the cache can return the sinks' columns with *zero* keys and attach :class:`SinkScores`: the
stored sink keys and, per query, the rotation that moves the query to where its sinks are. The
attention then computes the S sink scores of every query itself (``q x S`` dot products, in at
least float32) and adds them to those columns of the band (:func:`mask_for`): ``q . 0 + score``
is the score, so the one fused attention kernel sees exactly the logits of the copies.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .rotation import Rotator

SINK_ATTENTION = {"sdpa": "streamingllm_sdpa", "eager": "streamingllm_eager"}
#: Implementations that honour bands themselves, beyond :data:`SINK_ATTENTION`'s variants
#: (the softmax-sink attention of :mod:`streamingllm.sink_llama` adds its own on import).
BAND_AWARE: set[str] = set(SINK_ATTENTION.values())
#: Implementations that return attention probabilities (what :mod:`streamingllm.evals.attention` reads).
RETURNS_PROBABILITIES: set[str] = {"eager", SINK_ATTENTION["eager"]}
_BAND = "_streamingllm_band"
_SCORES = "_streamingllm_sink_scores"
_MEMORY = "_streamingllm_memory"
_registered = False


@dataclass
class SinkScores:
    """The sink logits of an exact chunk, computed in the attention from the query (see above).

    Attributes:
        keys: the stored sink keys (batch, kv_heads, s, head_dim), at positions ``0 .. s - 1``, in
            at least float32; the returned keys hold zeros in their ``s`` first columns.
        cos, sin: (q, rot_dim / 2) rotation of each query from its model position to the position
            the sinks must be seen from (each query's own in-cache position).
        rotator: the :class:`~streamingllm.rotation.Rotator` that applies them.
    """

    keys: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    rotator: Rotator


def attach_sink_scores(keys: torch.Tensor, scores: SinkScores) -> torch.Tensor:
    """Mark ``keys`` (whose first ``scores.keys.shape[-2]`` columns are zeros) with the sink keys
    whose logits the sink-aware attention adds to the mask."""
    setattr(keys, _SCORES, scores)
    return keys


def attach_band(keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mark ``keys`` (returned by a cache update) with the additive mask (1, 1, q, keys) their
    chunk must be attended with; sink-aware attention uses it instead of the model's mask."""
    setattr(keys, _BAND, mask)
    return keys


def attach_memory(keys: torch.Tensor, view) -> torch.Tensor:
    """Mark ``keys`` (returned by a :class:`~streamingllm.cache.MemoryCache` layer) with the view that
    completes the layer's forward once it has the queries (``view.attend``): the memory lookup and
    the attention over what it retrieved."""
    setattr(keys, _MEMORY, view)
    return keys


def _memory_attention(module, query: torch.Tensor, key: torch.Tensor, kwargs: dict):
    """The attention of a :class:`~streamingllm.cache.MemoryCache` layer, or None for any other keys."""
    view = getattr(key, _MEMORY, None)
    if view is None:
        return None
    softcap = kwargs.get("softcap") or getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    return view.attend(module, query, key, kwargs.get("scaling"), softcap), None


def band_of(keys: torch.Tensor) -> torch.Tensor | None:
    """The band attached to ``keys`` by :func:`attach_band`, or None."""
    return getattr(keys, _BAND, None)


def mask_for(module, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float | None = None):
    """The mask a band-aware attention must use: the band attached to ``key``, else the model's;
    with the sink logits added to its first columns when ``key`` carries :class:`SinkScores`.

    Args:
        module: the attention module (its ``config.attn_logit_softcapping`` is applied to the sink
            logits, as the model's eager attention applies it to the others).
        query: (batch, heads, q, head_dim), as the model rotated it.
        key: (batch, kv_heads, keys, head_dim), as the cache returned it.
        attention_mask: the model's additive mask, or None.
        scaling: the factor on the dot products (``module.scaling``, else ``head_dim ** -0.5``, when None).
    """
    band = band_of(key)
    mask = attention_mask if band is None else band
    term: SinkScores | None = getattr(key, _SCORES, None)
    if term is None:
        return mask
    if mask is None:
        raise ValueError("an exact chunk reached the attention without its band: pass the mask "
                         "SinkCache.exact_chunk_mask(q) returned as attention_mask")
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    rotated = term.rotator.rotate(query, term.cos, term.sin, out=query.new_empty(query.shape, dtype=term.cos.dtype))
    sinks = term.keys.repeat_interleave(query.shape[1] // term.keys.shape[1], dim=1)
    logits = torch.matmul(rotated, sinks.transpose(-1, -2)) * scaling  # (batch, heads, q, s)
    cap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if mask.dtype == torch.bool:  # a boolean mask (True = attend) as the additive one it stands for
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, torch.finfo(query.dtype).min)
    s = logits.shape[-1]
    full = torch.empty((*logits.shape[:3], key.shape[-2]), dtype=mask.dtype, device=mask.device)
    full.copy_(mask[..., : key.shape[-2]])
    full[..., :s] += logits.to(mask.dtype)
    return full


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (memory := _memory_attention(module, query, key, kwargs)) is not None:
        return memory
    mask = mask_for(module, query, key, attention_mask, kwargs.get("scaling"))
    if _one_query_16bit_on_cpu(module, query, kwargs):
        return one_query_attention(query, key, value, mask, kwargs.get("scaling")), None
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def _one_query_16bit_on_cpu(module, query: torch.Tensor, kwargs: dict) -> bool:
    """A decode step's attention in bf16/fp16 on the CPU, where torch's fused kernel is several
    times slower than two matmuls (7x at 2,048 keys: benchmarks/cpu_attention.py), and nothing
    beyond plain softmax attention is asked for (no soft-capping, no sink logits, no dropout)."""
    return (query.shape[2] == 1 and query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)
            and not kwargs.get("softcap") and not kwargs.get("dropout") and not hasattr(module, "sinks")
            and not getattr(getattr(module, "config", None), "attn_logit_softcapping", None))


def one_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                        scaling: float | None = None) -> torch.Tensor:
    """Attention of single queries, by the book: ``softmax(q k^T * scaling + mask) v``, the softmax
    in float32, grouped-query heads matched without copying the keys and values.

    Args:
        query: (batch, heads, 1, head_dim); key, value: (batch, kv_heads, keys, head_dim).
        mask: additive, or boolean (True = attend), broadcastable to (batch, 1, 1, keys) (longer
            masks are cut to the keys), or None.
        scaling: factor on the dot products (``head_dim ** -0.5`` when None).

    Returns:
        (batch, 1, heads, head_dim), as transformers' attention functions return it.
    """
    b, h, _, d = query.shape
    kv = key.shape[1]
    scaling = d**-0.5 if scaling is None else scaling
    q = query.reshape(b, kv, h // kv, d)  # the query heads that share each key/value head
    scores = torch.matmul(q, key.transpose(-1, -2)) * scaling  # (batch, kv_heads, group, keys)
    if mask is not None:
        mask = mask[..., : key.shape[-2]].reshape(mask.shape[0], 1, 1, -1)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).reshape(b, h, 1, d).transpose(1, 2)


def _eager(module, query, key, value, attention_mask, **kwargs):
    """The model file's own ``eager_attention_forward`` (each model defines one), with the band."""
    if (memory := _memory_attention(module, query, key, kwargs)) is not None:
        return memory
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__} has no eager_attention_forward; use sdpa")
    return eager(module, query, key, value, mask_for(module, query, key, attention_mask, kwargs.get("scaling")), **kwargs)


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
