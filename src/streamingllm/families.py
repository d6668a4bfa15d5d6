"""Model-family specifics, kept as data.

Every supported architecture is one :class:`Family` row: how its attention encodes
positions, whether the position ids reach ``Cache.update`` (so the cache can follow the
caller's positions), and which config attribute names a built-in sliding window. The
cache reads only this table; nothing else in the library branches on ``model_type``.

Hybrid models (Gemma 2/3, gpt-oss, Qwen2 with ``use_sliding_window``) name each layer's
attention in ``config.layer_types``: ``"full_attention"`` (global) or ``"sliding_attention"``
(the model's own window of ``config.sliding_window`` tokens). :func:`layer_types_of` reads them
(a model with a ``sliding_window`` and no list, Mistral's, slides in every layer), and
:func:`rope_inv_freq` gives each type's own rotary frequencies (Gemma 3: base 10,000 on
sliding layers, 1,000,000 on global ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .compat import text_config

PositionKind = Literal["rope", "alibi"]


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be streamed exactly (or at all) by this library."""


@dataclass(frozen=True)
class Family:
    """How one architecture encodes positions.

    Attributes:
        name: human-readable family name, used in messages and docs.
        positions: ``"rope"`` (rotary embeddings applied to keys before caching) or
            ``"alibi"`` (a linear bias on key index added inside attention).
        positions_visible: True when the model forwards ``position_ids`` into
            ``Cache.update`` kwargs, so the cache can see which positions the caller used.
        sliding_window_attr: config attribute holding a built-in sliding window, or None.
        alibi_table_attr: config attribute holding the length of a precomputed ALiBi bias
            table (keys beyond it have no bias), or None.
        attention_interface: True when the model attends through transformers' attention
            interface, so a sink-aware implementation (:mod:`streamingllm.attention`) can give
            overflowing chunks their exact band inside ``model.generate``.
        bias_from_seq_length: True when the model sizes its ALiBi bias from
            ``cache.get_seq_length()``, which must then be the number of cached tokens instead of
            the number consumed; ``generate()`` cannot continue such a stream after eviction.
    """

    name: str
    positions: PositionKind
    positions_visible: bool
    sliding_window_attr: str | None = None
    alibi_table_attr: str | None = None
    attention_interface: bool = True
    bias_from_seq_length: bool = False


_ROPE_VISIBLE = dict(positions="rope", positions_visible=True)

FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", **_ROPE_VISIBLE),
    "mistral": Family("Mistral", sliding_window_attr="sliding_window", **_ROPE_VISIBLE),
    "qwen2": Family("Qwen2", sliding_window_attr="sliding_window", **_ROPE_VISIBLE),
    "qwen3": Family("Qwen3", sliding_window_attr="sliding_window", **_ROPE_VISIBLE),
    "gemma": Family("Gemma", **_ROPE_VISIBLE),
    "gemma2": Family("Gemma 2", sliding_window_attr="sliding_window", **_ROPE_VISIBLE),
    "gemma3_text": Family("Gemma 3", sliding_window_attr="sliding_window", **_ROPE_VISIBLE),
    "gpt_oss": Family("gpt-oss", sliding_window_attr="sliding_window", **_ROPE_VISIBLE),
    "sink_llama": Family("Llama with a softmax sink (streamingllm.sink_llama)", **_ROPE_VISIBLE),
    "phi3": Family("Phi-3", sliding_window_attr="sliding_window", **_ROPE_VISIBLE),
    "gpt_neox": Family("GPT-NeoX/Pythia", positions="rope", positions_visible=False),
    "falcon": Family("Falcon (RoPE)", positions="rope", positions_visible=False, attention_interface=False),
    "falcon-alibi": Family("Falcon (ALiBi)", positions="alibi", positions_visible=False, attention_interface=False,
                           bias_from_seq_length=True),
    "mpt": Family("MPT", positions="alibi", positions_visible=False, alibi_table_attr="max_seq_len",
                  attention_interface=False),
    "bloom": Family("BLOOM", positions="alibi", positions_visible=False, attention_interface=False),
}

_REFUSED: dict[str, str] = {
    "gpt2": (
        "GPT-2 adds learned absolute position embeddings to the token embeddings, so the "
        "position of every cached key is baked into its hidden state and cannot be moved "
        "inside the cache. StreamingLLM cannot be applied exactly; use a RoPE or ALiBi model."
    ),
}

#: The layer types a cache knows how to keep (``config.layer_types``); see :func:`layer_types_of`.
FULL, SLIDING = "full_attention", "sliding_attention"


def supported_families() -> str:
    """A comma-separated list of supported families, for error messages."""
    names = sorted({f.name for f in FAMILIES.values()})
    return ", ".join(names)


def family_of(config) -> Family:
    """Return the :class:`Family` row of a transformers config, or raise a clear error."""
    model_type = getattr(config, "model_type", None)
    if model_type == "falcon" and getattr(config, "alibi", False):
        model_type = "falcon-alibi"
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in _REFUSED:
        raise UnsupportedModelError(f"model_type={model_type!r}: {_REFUSED[model_type]}")
    raise UnsupportedModelError(
        f"model_type={model_type!r} is not supported. Supported families: {supported_families()}."
    )


_FROZEN_ROPE_REFUSED = {
    "dynamic": "dynamic NTK scaling recomputes the rotary frequencies from the longest position seen",
    "longrope": "LongRoPE switches between its short and long frequency factors at the original trained length",
}


def rope_type_of(config, layer_type: str | None = None) -> str:
    """The config's RoPE scaling type on layers of ``layer_type`` (``"default"`` when none)."""
    params = _rope_parameters(config, layer_type) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type") or params.get("type") or "default")


def check_rope_scaling(config) -> None:
    """Refuse RoPE scalings whose frequencies change with the sequence length: a cached key would
    have to be re-rotated at every change (default, linear, llama3 and yarn have fixed frequencies)."""
    for rope_type in {rope_type_of(config, t) for t in (FULL, SLIDING)}:
        if rope_type not in _FROZEN_ROPE_REFUSED:
            continue
        raise UnsupportedModelError(
            f"rope_type={rope_type!r}: {_FROZEN_ROPE_REFUSED[rope_type]}, so keys cached at earlier positions were "
            "rotated with other frequencies than the query's; not supported. Supported: default, linear, llama3, yarn.")


def sliding_window_of(config, family: Family) -> int | None:
    """The model's own sliding-window length in tokens, or None when it has none in use."""
    if family.sliding_window_attr is None:
        return None
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/Qwen3 keep it off by default
        return None
    window = getattr(config, family.sliding_window_attr, None)
    return int(window) if window else None


def layer_types_of(config, family: Family) -> list[str]:
    """Each layer's attention type, :data:`FULL` or :data:`SLIDING`, as the model runs it.

    ``config.layer_types`` where the config has one; otherwise every layer slides when the model
    has a sliding window in use (Mistral, Phi-3), else none does. Other types (chunked or linear
    attention) raise :class:`UnsupportedModelError`.
    """
    n = int(config.num_hidden_layers)
    window = sliding_window_of(config, family)
    types = getattr(config, "layer_types", None)
    if types is None:
        return [SLIDING if window is not None else FULL] * n
    types = [str(t) for t in types][:n]
    odd = sorted(set(types) - {FULL, SLIDING})
    if odd:
        raise UnsupportedModelError(
            f"layer_types {odd} of {family.name}: only {FULL!r} and {SLIDING!r} layers can be streamed")
    if SLIDING in types and window is None:  # Qwen2 keeps its sliding layers off unless use_sliding_window
        types = [FULL] * n
    return types


def _rope_parameters(config, layer_type: str | None) -> dict:
    """The RoPE parameters of ``layer_type`` (configs such as Gemma 3's nest them per layer type)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    nested = {FULL, SLIDING} & set(params)
    if nested:
        params = dict(params.get(layer_type or FULL) or params[sorted(nested)[0]])
    return params


def rope_inv_freq(model_or_config, layer_type: str | None = None) -> torch.Tensor:
    """The rotary inverse frequencies (radians per position) the model really uses on layers of
    ``layer_type`` (:data:`FULL` or :data:`SLIDING`; None: the model's only ones, or its global ones).

    Read from the model's rotary module when a model is given, so the cache rotates with the
    exact float32 values the model uses (``inv_freq``, or ``{layer_type}_inv_freq`` where each
    layer type has its own); computed from the config otherwise. Its length is half the number of
    rotated dimensions per head (partial rotary is covered).
    """
    if isinstance(model_or_config, torch.nn.Module):
        names = ("inv_freq",) if layer_type is None else (f"{layer_type}_inv_freq", "inv_freq")
        for name in (*names, f"{FULL}_inv_freq"):
            for module in model_or_config.modules():
                inv_freq = getattr(module, name, None)
                if isinstance(inv_freq, torch.Tensor):
                    return inv_freq.detach().float().cpu()
        model_or_config = model_or_config.config
    config = model_or_config
    params = _rope_parameters(config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        nested = bool({FULL, SLIDING} & set(getattr(config, "rope_parameters", None) or {}))
        kwargs = {"layer_type": layer_type or FULL} if nested else {}
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
        return inv_freq.float()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    base = params.get("rope_theta", 10000.0)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def alibi_limit(config, family: Family) -> int | None:
    """Longest key length an ALiBi model's bias table covers (MPT precomputes one), or None."""
    if family.alibi_table_attr is None:
        return None
    return int(getattr(config, family.alibi_table_attr))


def trained_length(config) -> int | None:
    """The context length the model was trained for, in tokens (``max_position_embeddings``, or
    MPT's ``max_seq_len``), if its config states one. Positions ``0 .. trained_length - 1`` were trained."""
    config = text_config(getattr(config, "config", config))
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "max_seq_len", None)
    return int(n) if n else None


def past_trained_length(config, cache_tokens: int) -> int | None:
    """The trained length when a cache of ``cache_tokens`` tokens makes the model use untrained
    positions (the next token sits at position ``cache_tokens``), else None."""
    trained = trained_length(config)
    return trained if trained is not None and cache_tokens >= trained else None
