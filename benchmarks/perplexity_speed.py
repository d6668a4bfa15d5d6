"""Streaming-perplexity throughput: exact chunked evaluation vs feeding the stream token by token.

Run from the repository root (about 2 minutes on 2 CPU cores):

    . .venv/bin/activate && python benchmarks/perplexity_speed.py --num-tokens 2048 --cache-size 512

Both arms score the same Austen tokens with the same SinkCache configuration (S sinks + W recent
tokens, S + W = cache size). The chunked arm feeds ``--chunk-size`` tokens per forward with the
cache's banded mask; the token-by-token arm feeds one token per forward, which is what a plain
streaming loop does. Printed: tokens/s of each arm, their ratio, and the largest per-token NLL
difference between them (they must agree to 1e-4 nats in float32).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from streamingllm.evals.corpus import austen_text
from streamingllm.evals.perplexity import Setting, score_cached
from streamingllm.models import DEFAULT_MODEL, load


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-tokens", type=int, default=2048, help="tokens scored by each arm (> cache size, so it evicts)")
    p.add_argument("--cache-size", type=int, default=512, help="S + W (tokens)")
    p.add_argument("--sink-size", type=int, default=4, help="S (tokens)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per forward in the chunked arm")
    p.add_argument("--methods", nargs="+", default=["streaming", "window"], choices=["streaming", "window"])
    p.add_argument("--model", default=DEFAULT_MODEL)
    a = p.parse_args(argv)
    if a.num_tokens < 2 or a.cache_size <= a.sink_size or a.chunk_size < 1:
        p.error("need --num-tokens >= 2, --cache-size > --sink-size, --chunk-size >= 1")
    torch.set_grad_enabled(False)
    model, tokenizer = load(a.model)
    ids = torch.tensor(tokenizer(austen_text()[: a.num_tokens * 12], add_special_tokens=False).input_ids[: a.num_tokens])
    print(
        f"model {a.model} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()} | {len(ids)} Austen tokens | loadavg {os.getloadavg()[0]:.2f}"
    )
    print(f"{'setting':>18} {'chunked tok/s':>14} {'token-by-token tok/s':>21} {'speed-up':>9} {'max |dNLL|':>11}")
    for method in a.methods:
        s = a.sink_size if method == "streaming" else 0
        setting = Setting(method, s, a.cache_size - s)
        score_cached(model, ids[:300], setting, chunk_size=a.chunk_size)  # warm-up
        t0 = time.perf_counter()
        chunked = score_cached(model, ids, setting, chunk_size=a.chunk_size)
        t1 = time.perf_counter()
        single = score_cached(model, ids, setting, chunk_size=1)
        t2 = time.perf_counter()
        fast, slow = len(chunked.nll) / (t1 - t0), len(single.nll) / (t2 - t1)
        diff = float(np.abs(chunked.nll - single.nll).max())
        print(f"{setting.label:>18} {fast:>14.1f} {slow:>21.1f} {fast / slow:>8.1f}x {diff:>11.2e}", flush=True)
    print(f"loadavg at end {os.getloadavg()[0]:.2f} (other CPU load slows both arms)")


if __name__ == "__main__":
    main()
