"""Differences between transformers releases and model classes, each handled once.

* the cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or
  ``past_key_values`` (earlier 5.x, which silently ignores ``cache=``);
* whether ``model.forward`` takes ``logits_to_keep`` (compute only the last logits);
* how a ``DynamicCache`` is built (``config=`` or no argument);
* the text part of a (possibly multimodal) config, and its vocabulary size.
"""

from __future__ import annotations

import functools
import inspect


def _forward_parameters(model) -> frozenset[str]:
    return _parameters_of(type(model))


@functools.cache
def _parameters_of(model_class) -> frozenset[str]:
    """``forward``'s parameter names, looked up once per model class (not once per step)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_argument(model) -> str:
    """Name of ``model.forward``'s cache argument: ``"cache"`` or ``"past_key_values"``."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` to pass to ``model(...)`` (see :func:`cache_argument`)."""
    return {cache_argument(model): cache}


def last_logits_kwargs(model) -> dict:
    """``{"logits_to_keep": 1}`` when ``model.forward`` can compute the last token's logits only
    (saves a (T, vocab) projection), else ``{}`` (the caller then slices the last row)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def new_dense_cache(model):
    """An empty ``DynamicCache`` for ``model``: dense attention, every token kept."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # releases whose DynamicCache takes no config
        return DynamicCache()


def text_config(config):
    """The text model's config (the config itself for text-only models)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def vocab_size(model_or_config) -> int:
    """Vocabulary size (token ids are in ``[0, vocab_size)``)."""
    config = getattr(model_or_config, "config", model_or_config)
    return int(text_config(config).vocab_size)
