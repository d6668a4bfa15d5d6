"""One batched decode step of B independent streams (``decode_rows``) against B single steps.

Each of B streams has its own SinkCache (--sink-size + --window-size, filled with --prompt-tokens
random tokens); one step feeds every stream one token. Rows of B = 1, 2, 4, 8 are timed
interleaved (--rounds rounds of --steps steps each, median per round), on the default model.

    python benchmarks/batched_decode.py --batch 1 2 4 8 --rounds 3 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from streamingllm import SinkCache, load, prefill
from streamingllm.feed import decode_rows
from streamingllm.report import format_table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--sink-size", type=int, default=4)
    p.add_argument("--window-size", type=int, default=252)
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    model, _ = load()
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    arms = {}
    for b in args.batch:
        caches = [SinkCache(model, args.sink_size, args.window_size) for _ in range(b)]
        for c in caches:
            prefill(model, c, torch.randint(0, 1000, (1, args.prompt_tokens), generator=g))
        arms[b] = (caches, torch.randint(0, 1000, (b,), generator=g))
    times = {b: [] for b in args.batch}
    for _ in range(args.rounds):
        for b, (caches, tokens) in arms.items():
            decode_rows(model, caches, tokens)  # warm
            samples = []
            for _ in range(args.steps):
                t = time.perf_counter()
                decode_rows(model, caches, tokens)
                samples.append(time.perf_counter() - t)
            times[b].append(statistics.median(samples))
    one = statistics.median(times[args.batch[0]]) / args.batch[0]
    rows = []
    for b in args.batch:
        step = statistics.median(times[b])
        rows.append([str(b), f"{1e3 * step:.1f}", f"{step / (one * args.batch[0]):.2f}", f"{b / step:.1f}",
                     f"{b * one / step:.2f}"])
    print(format_table(["streams", "ms per step", "step / single step", "tokens/s", "speed-up over one at a time"], rows))


if __name__ == "__main__":
    main()
