"""Per-token decode time: SinkCache vs transformers' DynamicCache holding the same number of tokens.

Run from the repository root:

    . .venv/bin/activate && PYTHONPATH=src python benchmarks/decode_speed.py --sizes 256 1024 2048 --steps 64

For each size N both caches hold N tokens before every timed step, so each step attends to N + 1 keys:

* sink: ``SinkCache(model, sink_size=4, window_size=N - 4)`` prefilled with N + 64 tokens, so it is
  full and evicts one token per step (the amortized window rotation / compaction is part of its cost);
* dynamic: ``DynamicCache(config=model.config)`` filled with exactly N tokens; after every timed step
  it is cropped back to N tokens (``crop(-1)``, outside the timed region).

Single-token steps ``model(input_ids=tok, cache=c, use_cache=True)`` run under ``torch.no_grad()``,
timed one by one with ``time.perf_counter``. After a warm-up, the arms are interleaved in blocks
(sink/dynamic, then dynamic/sink, ...) so machine noise hits both alike. Reported: median and p90
ms/token per arm, mean, and the ratio of medians (sink / dynamic; lower is better).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch
from transformers import DynamicCache

from streamingllm.cache import SinkCache
from streamingllm.models import DEFAULT_MODEL, load
from streamingllm.stream import prefill

SINK = 4
EXTRA = 64  # tokens past capacity fed to the sink cache so it is evicting when timed
BLOCK = 8  # steps per arm before switching to the other arm


def fill_dynamic(model, ids: torch.Tensor, chunk: int = 256) -> DynamicCache:
    """A DynamicCache holding exactly ``ids.shape[1]`` tokens."""
    cache = DynamicCache(config=model.config)
    for i in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, i : i + chunk], cache=cache, use_cache=True)
    return cache


def timed_step(model, cache, tok: torch.Tensor) -> float:
    """Seconds taken by one single-token decode step."""
    t0 = time.perf_counter()
    model(input_ids=tok, cache=cache, use_cache=True)
    return time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank on the sorted list)."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


@torch.no_grad()
def bench_size(model, n: int, steps: int, warmup: int, vocab: int, gen: torch.Generator) -> dict[str, float]:
    """Time decode steps of both caches at size ``n``; returns ms statistics."""
    ids = torch.randint(0, vocab, (1, n + EXTRA), generator=gen)
    toks = torch.randint(0, vocab, (warmup + steps, 1, 1), generator=gen)
    sink = SinkCache(model, sink_size=SINK, window_size=n - SINK)
    prefill(model, sink, ids)
    assert sink.cached_tokens == n, (sink.cached_tokens, n)
    dyn = fill_dynamic(model, ids[:, :n])
    assert dyn.get_seq_length() == n

    def dyn_step(tok: torch.Tensor) -> float:
        dt = timed_step(model, dyn, tok)
        dyn.crop(-1)  # back to n tokens, outside the timed region
        return dt

    arms = {"sink": lambda tok: timed_step(model, sink, tok), "dynamic": dyn_step}
    for i in range(warmup):
        for run in arms.values():
            run(toks[i])
    times: dict[str, list[float]] = {"sink": [], "dynamic": []}
    i, block = warmup, 0
    while i < warmup + steps:
        k = min(BLOCK, warmup + steps - i)
        order = ("sink", "dynamic") if block % 2 == 0 else ("dynamic", "sink")
        for name in order:  # both arms see the same tokens
            times[name] += [arms[name](toks[j]) for j in range(i, i + k)]
        i, block = i + k, block + 1
    assert sink.cached_tokens == n and dyn.get_seq_length() == n
    out: dict[str, float] = {"size": n}
    for name, xs in times.items():
        ms = [x * 1e3 for x in xs]
        out[f"{name}_ms"], out[f"{name}_p90"] = statistics.median(ms), pct(ms, 0.9)
        out[f"{name}_mean"] = statistics.mean(ms)
    out["ratio"] = out["sink_ms"] / out["dynamic_ms"]
    out["ratio_mean"] = out["sink_mean"] / out["dynamic_mean"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048], help="tokens held by each cache")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per arm and size")
    p.add_argument("--warmup", type=int, default=8, help="untimed decode steps per arm and size")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if min(a.sizes) <= SINK or a.steps < 1 or a.warmup < 0:
        p.error(f"sizes must be > {SINK}, steps >= 1, warmup >= 0")
    t0 = time.perf_counter()
    model, _ = load(a.model)
    print(f"model {a.model} loaded in {time.perf_counter() - t0:.1f} s")
    print(
        f"machine: {platform.processor() or platform.machine()} | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()} | steps {a.steps} warmup {a.warmup} block {BLOCK} | "
        f"loadavg {os.getloadavg()[0]:.2f} (other CPU load skews both arms)"
    )
    gen = torch.Generator().manual_seed(a.seed)
    cols = ["size", "sink_ms", "sink_p90", "dynamic_ms", "dynamic_p90", "ratio", "sink_mean", "dynamic_mean", "ratio_mean"]
    print("  ".join(f"{c:>12}" for c in cols))
    rows = []
    for n in a.sizes:
        r = bench_size(model, n, a.steps, a.warmup, model.config.vocab_size, gen)
        rows.append(r)
        print("  ".join(f"{r[c]:>12d}" if c == "size" else f"{r[c]:>12.3f}" for c in cols), flush=True)
    print("ms = median ms/token, p90 = 90th percentile; ratio = sink_ms / dynamic_ms (target <= 1.00)")
    print(f"total {time.perf_counter() - t0:.1f} s, loadavg at end {os.getloadavg()[0]:.2f}")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows({c: (int(r[c]) if c == "size" else round(r[c], 4)) for c in cols} for r in rows)


if __name__ == "__main__":
    main()
