"""Integration: Gemma 3 270M (``--model gemma3-270m``), a hybrid of sliding-window and global
layers, assembled from its PyPI chunk packages. Marked slow: loading it takes about 50 s."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

from streamingllm import SinkCache
from streamingllm.families import FULL, SLIDING, rope_inv_freq
from streamingllm.feed import prefill
from streamingllm.models import GEMMA3_MODEL, ModelLoadError, load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    try:
        return load(GEMMA3_MODEL)
    except ModelLoadError as err:
        pytest.skip(str(err))


def _text_ids(tokenizer, n):
    from streamingllm.evals.corpus import austen_text

    return tokenizer(austen_text()[: 8 * n], return_tensors="pt").input_ids[:, :n]


def test_the_named_model_and_its_random_weight_twin(gemma3):
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and tokenizer is not None
    twin, _ = load(GEMMA3_MODEL, random_weights=True)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(twin) == shapes(model) and twin.config.layer_types == model.config.layer_types
    for layer_type in (FULL, SLIDING):
        assert torch.equal(rope_inv_freq(twin, layer_type), rope_inv_freq(model, layer_type))
    assert not torch.equal(rope_inv_freq(model, FULL), rope_inv_freq(model, SLIDING))  # base 1e6 vs 1e4


def test_equals_transformers_dense_cache_while_no_global_token_is_evicted(gemma3):
    """900 tokens: the sliding layers (512) evict in both caches, the global ones in neither."""
    model, tokenizer = gemma3
    ids = _text_ids(tokenizer, 900)
    ours = prefill(model, SinkCache(model, 4, 1020), ids, chunk_size=128, return_all_logits=True)
    with torch.no_grad():
        dense = DynamicCache(config=model.config)
        theirs = torch.cat([model(ids[:, i : i + 128], cache=dense).logits for i in range(0, 900, 128)], dim=1)
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_exact_chunks_equal_token_by_token_on_the_real_model(gemma3):
    """A 4 + 124 global cache and the 512-token sliding windows, both overflowed by 256-token chunks."""
    model, tokenizer = gemma3
    ids = _text_ids(tokenizer, 700)
    one = prefill(model, SinkCache(model, 4, 124), ids, chunk_size=1, return_all_logits=True)
    many = prefill(model, SinkCache(model, 4, 124), ids, chunk_size=256, return_all_logits=True)
    assert (one - many).abs().max().item() <= 1e-3


def test_generate_streams_gemma3_past_2000_tokens_through_a_4_plus_508_cache_with_flat_memory():
    cmd = [sys.executable, "-m", "streamingllm.cli", "generate", "--model", GEMMA3_MODEL,
           "Once upon a time, in a small village by the sea, there lived", "--sink-size", "4", "--window-size", "508",
           "--max-new-tokens", "2100", "--temperature", "0.8", "--seed", "0", "--stats"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if "not installed" in run.stderr:
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr[-2000:]
    reports = re.findall(r"decode (\d+) tokens, [\d.]+ tok/s, cache (\d+)/(\d+) tokens \(([\d.]+) MiB\), seen (\d+), "
                         r"RSS (\d+) MiB", run.stderr)
    assert reports and int(reports[-1][0]) == 2100 and int(reports[-1][4]) > 2000
    full = [r for r in reports if r[1] == r[2] == "512"]
    assert len(full) >= 6  # every report from the 3rd on: the cache stayed full
    assert len({r[3] for r in full}) == 1  # its storage did not grow by a byte (a dense one: 6 KiB per token)
    rss = [int(r[5]) for r in full[1:]]
    assert max(rss) - min(rss) <= 24, rss  # nor did the process
    assert len(run.stdout.split()) > 800  # words, not one repeated token
