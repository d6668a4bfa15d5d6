"""A decode step's attention on the CPU: torch's fused kernel against two matmuls and a float32
softmax (``streamingllm.attention.one_query_attention``), per dtype and number of keys.

    . .venv/bin/activate && python benchmarks/cpu_attention.py

One query per head (9 heads over 3 key/value heads, head dim 64: the default model's layer),
an additive mask; both arms on the same tensors, interleaved in blocks of 20 calls
(``streamingllm.bench.interleave``) after 20 warm-up calls each; the median of 200 calls and the
ratio fused / by the book.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from streamingllm.attention import one_query_attention
from streamingllm.bench import arm_stats, interleave


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, nargs="+", default=[256, 1024, 2048, 4096], help="keys attended to")
    p.add_argument("--calls", type=int, default=200, help="timed calls per arm, dtype and number of keys")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'keys':>6} {'dtype':>9} {'fused sdpa us':>14} {'by the book us':>15} {'ratio':>6} {'max |diff|':>11}")
    for keys in a.keys:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, 9, 1, 64, generator=g).to(dtype)
            k, v = (torch.randn(1, 3, keys, 64, generator=g).to(dtype) for _ in range(2))
            mask = torch.zeros(1, 1, 1, keys, dtype=dtype)
            arms = {"fused": lambda i: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                    "book": lambda i: one_query_attention(q, k, v, mask)}
            diff = (arms["fused"](0).transpose(1, 2).float() - arms["book"](0).float()).abs().max().item()
            s = arm_stats(interleave(arms, a.calls, block=20, warmup=20), baseline="book")
            fused, book = (1e3 * s[m]["median_ms"] for m in ("fused", "book"))
            print(f"{keys:>6} {str(dtype).split('.')[1]:>9} {fused:>14.0f} {book:>15.0f} "
                  f"{s['fused']['vs_baseline']:>6.2f} {diff:>11.1e}", flush=True)


if __name__ == "__main__":
    main()
