"""Llama with a sink in the softmax: SoftMax1 ("zero sink") and gpt-oss's learned per-head sink logit.

Both add one more logit to every attention row, a *virtual* key with no value:

    p_j = exp(s_j) / (exp(b_h) + sum_k exp(s_k)),      output = sum_j p_j v_j

so a head can attend to nothing. ``attention_sink="zero"`` fixes ``b_h = 0`` (Miller's SoftMax1,
the paper's "zero sink"); ``attention_sink="learned"`` learns one ``b_h`` per head (gpt-oss's
``sinks``). Everything else is :class:`~transformers.LlamaForCausalLM`, so the two differ from a
vanilla Llama only in that logit.

The model is an ordinary transformers model: :class:`SinkLlamaConfig` (``model_type="sink_llama"``)
and :class:`SinkLlamaForCausalLM` are registered with the Auto classes when this module is
imported (``import streamingllm`` does), so ``AutoModelForCausalLM.from_pretrained(folder)`` loads a
checkpoint. Its attention is one function registered with transformers' attention interface
(:data:`SINK_LOGIT_ATTENTION`), the model's only implementation: it returns probabilities (for
``output_attentions``) and honours the bands a :class:`~streamingllm.cache.SinkCache` attaches to
overflowing chunks, so the model streams exactly with the rest of the library.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaModel

from . import attention
from .checks import check_choice

__all__ = ["ATTENTION_SINKS", "SINK_LOGIT_ATTENTION", "SinkLlamaConfig", "SinkLlamaForCausalLM", "sink_logit_attention"]

#: The softmax sinks a :class:`SinkLlamaConfig` takes: a fixed zero logit, or a learned one per head.
ATTENTION_SINKS = ("zero", "learned")
#: The attention implementation's name in transformers' attention interface.
SINK_LOGIT_ATTENTION = "streamingllm_sink_logit"


def sink_logit_attention(module, query, key, value, attention_mask, scaling: float | None = None,
                         dropout: float = 0.0, **kwargs):
    """Attention with one extra logit per head, ``module.sinks`` (heads,), in every softmax row.

    Args:
        module: the attention module; ``module.sinks`` (heads,) holds the learned sink logits;
            without it, every sink logit is 0 (SoftMax1).
        query: (batch, heads, q, head_dim); key, value: (batch, kv_heads, keys, head_dim).
        attention_mask: the model's additive mask (batch or 1, 1, q, keys) or None; a band a sink
            cache attached to ``key`` replaces it (:func:`streamingllm.attention.mask_for`).
        scaling: factor on the dot products (``head_dim ** -0.5`` when None).
        dropout: dropout probability on the probabilities (training only).

    Returns:
        ``(output (batch, q, heads, head_dim), probabilities (batch, heads, q, keys))``; each row of
        the probabilities sums to one minus what the sink took.
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = attention.mask_for(module, query, key, attention_mask, scaling)
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores + mask[..., : key.shape[-2]]
    b, h, q, _ = scores.shape
    sinks = getattr(module, "sinks", None)  # learned logits, else SoftMax1's constant 0
    sinks = scores.new_zeros(1, h, 1, 1) if sinks is None else sinks.to(scores.dtype).reshape(1, h, 1, 1)
    sinks = sinks.expand(b, h, q, 1)
    logits = torch.cat([scores, sinks], dim=-1)
    probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # 16-bit: in fp32
    probs = probs[..., :-1].to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class SinkLlamaConfig(LlamaConfig):
    """A :class:`~transformers.LlamaConfig` with a softmax sink.

    Args:
        attention_sink: ``"zero"`` (SoftMax1: a fixed zero logit) or ``"learned"`` (one learned
            logit per attention head, initialised at zero).
        **kwargs: every :class:`~transformers.LlamaConfig` argument.
    """

    model_type = "sink_llama"

    def __init__(self, attention_sink: str = "learned", **kwargs):
        self.attention_sink = check_choice("attention_sink", attention_sink, ATTENTION_SINKS)
        super().__init__(**kwargs)


class SinkLlamaAttention(LlamaAttention):
    """Llama attention with ``sinks`` (heads,), the learned sink logits; with the zero sink it has
    none (the attention then uses the constant 0, which nothing can load wrong or train)."""

    def __init__(self, config: SinkLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.attention_sink == "learned":
            self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads))


class SinkLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: SinkLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = SinkLlamaAttention(config, layer_idx)


class SinkLlamaModel(LlamaModel):
    config_class = SinkLlamaConfig

    def __init__(self, config: SinkLlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(SinkLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class SinkLlamaForCausalLM(LlamaForCausalLM):
    """:class:`~transformers.LlamaForCausalLM` whose attention has a softmax sink (see the module)."""

    config_class = SinkLlamaConfig

    def __init__(self, config: SinkLlamaConfig):
        super().__init__(config)
        self.model = SinkLlamaModel(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SinkLlamaAttention) and hasattr(module, "sinks"):
            with torch.no_grad():
                module.sinks.zero_()

    def _check_and_adjust_attn_implementation(self, attn_implementation=None, *args, **kwargs) -> str:
        """The sink attention is the model's only implementation: None, "eager" and "sdpa" mean it,
        anything else is refused (an attention without the sink would compute another model)."""
        if attn_implementation not in (None, "eager", "sdpa", SINK_LOGIT_ATTENTION):
            raise ValueError(
                f"attn_implementation={attn_implementation!r}: a sink_llama model attends only through "
                f"{SINK_LOGIT_ATTENTION!r} (its softmax has a sink logit); allowed: None, 'eager', 'sdpa', "
                f"{SINK_LOGIT_ATTENTION!r}")
        return SINK_LOGIT_ATTENTION


def register() -> None:
    """Register the attention, the config and the model with transformers (idempotent)."""
    AttentionInterface.register(SINK_LOGIT_ATTENTION, sink_logit_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SINK_LOGIT_ATTENTION, eager_mask)
    attention.BAND_AWARE.add(SINK_LOGIT_ATTENTION)
    attention.RETURNS_PROBABILITIES.add(SINK_LOGIT_ATTENTION)
    AutoConfig.register(SinkLlamaConfig.model_type, SinkLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(SinkLlamaConfig, SinkLlamaForCausalLM, exist_ok=True)


register()
