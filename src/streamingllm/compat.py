"""Differences between transformers releases and model classes, each handled once.

The supported range is :data:`TRANSFORMERS_RANGE` (``pyproject.toml`` declares the same; CI runs
the cache's exactness tests on its lowest and newest releases). Earlier 5.x releases call the
cache argument ``past_key_values`` (``model(..., cache=c)`` is silently ignored there) and do not
pass position ids to ``Cache.update``; :func:`check_transformers` refuses them.

* the cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or
  ``past_key_values`` (earlier 5.x, which silently ignores ``cache=``);
* whether ``model.forward`` takes ``logits_to_keep`` (compute only the last logits);
* how a ``DynamicCache`` is built (``config=`` or no argument);
* the text part of a (possibly multimodal) config, and its vocabulary size;
* where the position ids sit among the keyword arguments a model passes to ``Cache.update``.
"""

from __future__ import annotations

import functools
import inspect

TRANSFORMERS_RANGE = ((5, 24), (6, 0))  # lowest supported release, first unsupported one


def check_transformers(version: str | None = None) -> None:
    """Raise ImportError naming the installed and the supported transformers releases when the
    installed one (or ``version``) is outside :data:`TRANSFORMERS_RANGE`."""
    if version is None:
        import transformers

        version = transformers.__version__
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    low, high = TRANSFORMERS_RANGE
    if not low <= parts < high:
        raise ImportError(
            f"streamingllm needs transformers>={low[0]}.{low[1]},<{high[0]} (found {version}): earlier releases "
            "ignore model(..., cache=c) or hide the position ids from the cache, so streaming would be silently "
            f"wrong. Install a supported one: pip install 'transformers>={low[0]}.{low[1]},<{high[0]}'")


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


def update_position_ids(kwargs: dict):
    """The position ids (rows, q) of the running forward, as the model passed them to ``Cache.update``
    (directly, or inside its ``kwargs``), or None when it passed none."""
    inner = kwargs.get("kwargs", kwargs)
    pos = inner.get("position_ids") if isinstance(inner, dict) else None
    if pos is None:
        return None
    return pos.reshape(-1, pos.shape[-1]) if pos.dim() > 1 else pos[None]
