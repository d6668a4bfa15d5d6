"""A decode step's attention on the CPU: torch's fused kernel against two matmuls and a float32
softmax (``streamingllm.attention.one_query_attention``), per dtype and number of keys.

    . .venv/bin/activate && python benchmarks/cpu_attention.py

One query per head (9 heads over 3 key/value heads, head dim 64: the default model's layer),
an additive mask, the median of 200 calls after 20 warm-up calls; both arms on the same tensors.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from streamingllm.attention import one_query_attention


def median_us(fn, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main() -> None:
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'keys':>6} {'dtype':>9} {'fused sdpa us':>14} {'by the book us':>15} {'ratio':>6} {'max |diff|':>11}")
    for keys in (256, 1024, 2048, 4096):
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, 9, 1, 64, generator=g).to(dtype)
            k, v = (torch.randn(1, 3, keys, 64, generator=g).to(dtype) for _ in range(2))
            mask = torch.zeros(1, 1, 1, keys, dtype=dtype)
            fused = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
            book = lambda: one_query_attention(q, k, v, mask)  # noqa: E731
            diff = (fused().transpose(1, 2).float() - book().float()).abs().max().item()
            a, b = median_us(fused), median_us(book)
            print(f"{keys:>6} {str(dtype).split('.')[1]:>9} {a:>14.0f} {b:>15.0f} {a / b:>6.2f} {diff:>11.1e}")


if __name__ == "__main__":
    main()
