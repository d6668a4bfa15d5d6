"""The memory-bandwidth limit of a decode step: what the hardware allows, for the decode benchmark.

Decoding one token at batch 1 reads every weight once and every cached key and value once, and
does little arithmetic per byte, so no step can be faster than those bytes divided by the
memory bandwidth. The bandwidth is measured, not looked up: the time of a large device-to-device
copy (each byte read once and written once).
"""

from __future__ import annotations

import time

import torch

COPY_BYTES = 256 << 20  # a copy this large is far past every cache level


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, repeats: int = 5) -> float:
    """Measured memory bandwidth of ``device`` in bytes per second: the best of ``repeats`` copies of
    ``nbytes``, counting each byte read and written (2 * nbytes per copy)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def weight_bytes(model) -> int:
    """Bytes of the model's weights: parameters and buffers (int8 weights and their scales are
    buffers), the embedding table included. Tied weights count once."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def kv_bytes(model, tokens: int) -> int:
    """Bytes of the keys and values of ``tokens`` tokens in every layer, in the model's dtype."""
    from ..compat import text_config

    c = text_config(model.config)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    element = torch.empty((), dtype=model.dtype).element_size()
    return 2 * c.num_hidden_layers * heads * head_dim * element * tokens


def limit_ms(model, tokens: int, bandwidth: float) -> float:
    """The fastest a step attending to ``tokens`` keys can be (ms): weights and KV read once each."""
    return 1000 * (weight_bytes(model) + kv_bytes(model, tokens)) / bandwidth
