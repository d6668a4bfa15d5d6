"""What a cache is checked for when it is built and allocated, and the errors and warnings it gives."""

from __future__ import annotations

import warnings

import torch

from ..checks import ArgumentError, check_int
from ..compat import check_transformers, text_config
from ..attention import attention_implementation, is_sink_attention
from ..families import (Family, UnsupportedModelError, alibi_limit, check_rope_scaling, family_of, past_trained_length,
                        sliding_window_of)
from ..memory import available_bytes
from .groups import GLOBAL, layer_policies


class CacheTooLargeError(ArgumentError):
    """The cache asked for would not fit in the device's memory (names ``window_size``)."""


class TrainedLengthWarning(UserWarning):
    """The cache is longer than the model's trained length: positions past it were never trained."""


class NativeWindowWarning(UserWarning):
    """Every layer of the model slides over its own window, which the cache keeps instead of sinks."""


def check_cache_sizes(sink_size, window_size) -> tuple[int, int]:
    """``(sink_size, window_size)`` checked as token counts (>= 0 and >= 1), before any model is at hand."""
    return check_int("sink_size", sink_size, 0), check_int("window_size", window_size, 1)


def check_model(model_or_config, sink_size: int, window_size: int) -> tuple:
    """The text config and :class:`~streamingllm.families.Family` of ``model_or_config`` (a model or
    its config), after checking that the installed transformers, the family, its RoPE scaling, its
    attention implementation and the cache's sizes (tokens) can stream exactly."""
    check_transformers()
    config = model_or_config.config if isinstance(model_or_config, torch.nn.Module) else model_or_config
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"model_or_config must be a transformers model or config, got {type(model_or_config).__name__}")
    config = text_config(config)
    family = family_of(config)
    check_fits(config, family, sink_size, window_size)
    check_attention(config)
    if family.positions == "rope":
        check_rope_scaling(config)
    return config, family


def check_fits(config, family: Family, sink_size: int, window_size: int) -> None:
    """Refuse cache sizes the model's own masking or bias tables would silently break, and warn
    about a cache longer than the model's trained length, or sinks no layer keeps."""
    total = sink_size + window_size
    if sink_size and GLOBAL not in layer_policies(config, family, sink_size, window_size):
        sliding = sliding_window_of(config, family)
        warnings.warn(
            f"every layer of this {family.name} model slides over its own window of {sliding} tokens, and "
            f"sink_size + window_size = {total} does not fit inside it: the cache keeps that window in every layer "
            f"(as the model was trained), and no attention sinks, since the model's mask would hide them; "
            f"for a smaller cache with sinks, use sink_size + window_size < {sliding}",
            NativeWindowWarning, stacklevel=4)
    limit = alibi_limit(config, family)
    if limit is not None and total + 1 > limit:
        raise ArgumentError(
            "window_size", f"must be <= {limit - sink_size - 1} for {family.name}: sink_size + window_size + 1 "
            f"must fit its ALiBi table ({family.alibi_table_attr}={limit})", window_size,
            mentions=("sink_size", "window_size"))
    trained = past_trained_length(config, total)
    if trained is not None:
        warnings.warn(
            f"sink_size + window_size = {total} reaches the model's trained length ({trained} tokens): the next "
            f"token sits at position {total}, past the trained ones, so quality may collapse as with dense attention",
            TrainedLengthWarning, stacklevel=4)


def check_attention(config) -> None:
    """Refuse attention implementations that cannot honour the cache's additive masks."""
    impl = getattr(config, "_attn_implementation", None) or ""
    if impl.startswith(("flash", "paged", "kernels-community")) or "flash" in impl:
        raise UnsupportedModelError(
            f"attn_implementation={impl!r}: flash-attention kernels take 2D padding masks only, so they cannot attend "
            "to the sinks at shifted positions inside a chunk (exact prefill) and are not tested with this cache; "
            "load the model with attn_implementation='sdpa' (or 'eager')")


def check_memory(need: int, device: torch.device, sink_size: int, window_size: int) -> None:
    """Refuse to allocate ``need`` bytes of cache on ``device`` when less is available."""
    free = available_bytes(device)
    if free is not None and need > free:
        raise CacheTooLargeError(
            "window_size", f"is too large: sink_size + window_size = {sink_size + window_size} tokens "
            f"need {need / 2**30:.2f} GiB of {device.type} memory for the cache, but "
            f"{free / 2**30:.2f} GiB is available; lower window_size", window_size,
            mentions=("sink_size", "window_size"))


def check_rows(config, family: Family, seen: int) -> None:
    """Refuse a left-padded batch (rows with other position ids) where its rows cannot be told apart
    or stream on their own: in a stream that has begun (``seen`` tokens), or for a family whose
    position ids do not reach the cache or whose attention cannot take the rows' masks."""
    if seen:
        raise ValueError("SinkCache: rows with different position ids arrived in a stream that has begun; "
                         "a padded batch must start in a new cache")
    if not (family.positions_visible and family.attention_interface and is_sink_attention(config)):
        raise ValueError(
            f"SinkCache: this batch is left-padded (its rows have other position ids), which needs a family whose "
            f"position ids reach the cache and the sdpa or eager attention ({family.name} with "
            f"attn_implementation={attention_implementation(config)!r} cannot); feed streams of equal length")
