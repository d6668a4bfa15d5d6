"""Optional dependencies: each lives behind a ``pip install streamingllm[EXTRA]`` extra.

The core (cache, feeding, loading, sessions) needs torch and transformers only. Evaluations and
benchmarks import their extra dependencies through :func:`require`, inside the function that
needs them, so a missing package names the extra that brings it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS: dict[str, str] = {
    "matplotlib": "plots",
    "rdata": "evals",
    "datasets": "hub",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "llama_cpp": "llamacpp",
    "ray": "replicas",
    "redis": "replicas",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming its extra.

    Args:
        module: the module to import, e.g. ``"matplotlib.pyplot"``.
        purpose: what it is needed for, shown in the message (``"plots"``).
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRAS.get(top, "all")
        raise MissingExtraError(
            f"{purpose} need the optional package {top!r}: pip install 'streamingllm[{extra}]'"
        ) from err
