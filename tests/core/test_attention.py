"""The sink-aware attention's own arithmetic: single 16-bit queries on the CPU by the book."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamingllm import SinkCache
from streamingllm.attention import one_query_attention
from streamingllm.feed import prefill
from tiny import VOCAB, tiny_model


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3)])
@pytest.mark.parametrize("boolean", [False, True], ids=["additive-mask", "boolean-mask"])
def test_one_query_attention_equals_torchs_sdpa(dtype, tol, heads, kv_heads, boolean):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, kv_heads, 37, 16, generator=g).to(dtype) for _ in range(2))
    allowed = torch.ones(2, 1, 1, 40, dtype=torch.bool)  # longer than the keys, as models' masks may be
    allowed[1, ..., 5:9] = False
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed[..., :37],
                                          enable_gqa=True, scale=0.3).transpose(1, 2)
    got = one_query_attention(q, k, v, allowed if boolean else additive, scaling=0.3)
    assert got.shape == (2, 1, heads, 16) and got.dtype == dtype
    assert (got.float() - want).abs().max().item() <= tol


def test_bfloat16_decode_through_the_one_query_path_equals_eager_attention():
    """A bf16 model decoding on the CPU (streamingllm_sdpa takes the by-the-book path for its single
    queries) against the same model with eager attention: within bf16 rounding (0.03 in logits)."""
    ids = torch.randint(0, VOCAB, (1, 90), generator=torch.Generator().manual_seed(1))
    out = {}
    for impl in ("sdpa", "eager"):
        model = tiny_model("llama", dtype=torch.bfloat16)
        model.set_attn_implementation(impl)
        cache = SinkCache(model, 4, 24)
        prefill(model, cache, ids[:, :40])
        with torch.no_grad():
            out[impl] = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(40, 90)], 1).float()
    assert (out["sdpa"] - out["eager"]).abs().max().item() <= 0.03
