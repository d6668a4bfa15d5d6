"""Exact chunked evaluation against plain causal chunked prefill and token-by-token feeding.

Run from the repository root (about 3 minutes on 2 CPU cores):

    . .venv/bin/activate && python benchmarks/perplexity_speed.py --num-tokens 4096 --cache-size 1024 --chunk-size 256

Every arm streams the same Austen tokens through a SinkCache of ``--sink-size`` sinks and
``--cache-size`` tokens in all, and scores each token's NLL:

* ``exact``: chunks of ``--chunk-size`` tokens with their exact band; each query's sink logits are
  computed by the sink-aware attention from one zero-key copy of the sinks (``SinkCache.sink_scores``);
* ``exact-copies``: the same band with one rotated copy of the sinks per overflowing query (the
  layout before, kept as the reference layout for padded batches);
* ``causal``: the same chunks under the model's plain causal mask (``fast_chunks``): what plain
  chunked prefill costs, and not exact (a query also sees up to ``chunk - 1`` older tokens);
* ``token``: one token per forward (with ``--token-by-token``), the definition of exactness.

Arms are interleaved over ``--rounds`` rounds (order rotating: ``streamingllm.bench.interleave``),
so machine noise hits them alike.
Printed per arm: tokens/s (median over rounds), its ratio to ``causal``, and the largest per-token
NLL difference to the reference (``token`` when run, else ``exact-copies``).

With ``--recompute N``, sliding window with re-computation also scores N tokens (spread over the
text) one window per forward and in batches of ``RECOMPUTE_BATCH_TOKENS`` tokens, interleaved the
same way: the evaluation's re-computation is the batched one.
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import torch
import torch.nn.functional as F

from streamingllm import SinkCache
from streamingllm.bench import arm_stats, interleave
from streamingllm.evals.corpus import austen_text
from streamingllm.evals.perplexity import RECOMPUTE_BATCH_TOKENS, score_recompute
from streamingllm.feed import iter_chunks
from streamingllm.models import DEFAULT_MODEL, load

ARMS = ("exact", "exact-copies", "causal", "token")


def score(model, ids: torch.Tensor, arm: str, sink_size: int, cache_size: int, chunk_size: int) -> np.ndarray:
    """Per-token NLL of ``ids[1:]`` for one arm."""
    cache = SinkCache(model, sink_size, cache_size - sink_size, fast_chunks=arm == "causal")
    cache.sink_scores = arm != "exact-copies"
    chunk = 1 if arm == "token" else chunk_size
    parts = []
    for start, logits in iter_chunks(model, cache, ids[:-1], chunk_size=chunk, exact=arm != "causal"):
        target = ids[start + 1 : start + 1 + logits.shape[1]]
        parts.append(F.cross_entropy(logits[0].float(), target, reduction="none").double())
    return torch.cat(parts).numpy()


def run_arms(arms: dict, rounds: int) -> tuple[dict, dict]:
    """Run each of ``arms`` (``{name: fn() -> result}``) ``rounds`` times, interleaved one call per
    block; returns each arm's last result and its seconds per run (:func:`arm_stats` of them)."""
    results = {}

    def stepper(name):
        return lambda i: results.__setitem__(name, arms[name]())

    times = interleave({name: stepper(name) for name in arms}, rounds, block=1)
    return results, arm_stats(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-tokens", type=int, default=4096, help="tokens scored by each arm (> cache size, so it evicts)")
    p.add_argument("--cache-size", type=int, default=1024, help="S + W (tokens)")
    p.add_argument("--sink-size", type=int, default=4, help="S (tokens)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per forward in the chunked arms")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the chunked arms")
    p.add_argument("--token-by-token", action="store_true", help="also run the token-by-token arm (once; slow)")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="also time re-computation over N scored tokens, one window per forward vs batched")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args(argv)
    if a.num_tokens <= a.cache_size or a.cache_size <= a.sink_size or a.chunk_size < 2 or a.rounds < 1:
        p.error("need --num-tokens > --cache-size > --sink-size, --chunk-size >= 2, --rounds >= 1")
    torch.set_grad_enabled(False)
    model, tokenizer = load(a.model, dtype=a.dtype)
    ids = torch.tensor(tokenizer(austen_text()[: a.num_tokens * 12], add_special_tokens=False).input_ids[: a.num_tokens])
    print(f"model {a.model} {a.dtype} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | {len(ids)} Austen tokens | cache {a.sink_size}+{a.cache_size - a.sink_size} "
          f"| chunk {a.chunk_size} | loadavg {os.getloadavg()[0]:.2f}")
    chunked = ["exact", "exact-copies", "causal"]
    for arm in chunked:  # warm-up
        score(model, ids[: a.cache_size + a.chunk_size + 8], arm, a.sink_size, a.cache_size, a.chunk_size)
    arms = {arm: (lambda arm=arm: score(model, ids, arm, a.sink_size, a.cache_size, a.chunk_size))
            for arm in chunked + ["token"] * a.token_by_token}
    nll, stats = run_arms({arm: arms[arm] for arm in chunked}, a.rounds)
    if a.token_by_token:  # once, after the rest: it takes as long as all the others together
        more, token = run_arms({"token": arms["token"]}, 1)
        nll.update(more)
        stats.update(token)
    ref = "token" if a.token_by_token else "exact-copies"
    causal = stats["causal"]["median_ms"]
    print(f"{'arm':>13} {'tok/s':>8} {'vs causal':>10} {'max |dNLL| vs ' + ref:>24} {'ppl':>8}")
    for arm in (x for x in ARMS if x in stats):
        rate = 1e3 * len(ids) / stats[arm]["median_ms"]
        diff = float(np.abs(nll[arm] - nll[ref]).max())
        print(f"{arm:>13} {rate:>8.1f} {causal / stats[arm]['median_ms']:>9.3f}x {diff:>24.2e} "
              f"{float(np.exp(nll[arm].mean())):>8.3f}", flush=True)
    if a.recompute:
        every = max(1, (len(ids) - a.cache_size - 2) // a.recompute)
        text = ids[: a.cache_size + 2 + every * a.recompute]  # its scored tokens past the first window
        scores, stats = run_arms({b: (lambda b=b: score_recompute(model, text, a.cache_size, every, batch_tokens=b))
                                  for b in (1, RECOMPUTE_BATCH_TOKENS)}, a.rounds)
        n = len(scores[1].nll)
        one, many = (1e3 * n / stats[b]["median_ms"] for b in (1, RECOMPUTE_BATCH_TOKENS))
        diff = float(np.abs(scores[1].nll - scores[RECOMPUTE_BATCH_TOKENS].nll).max())
        print(f"recompute {a.cache_size}: {n} tokens, one window per forward {one:.2f} tok/s, batched "
              f"({RECOMPUTE_BATCH_TOKENS // (a.cache_size + 1)} windows per forward) {many:.2f} tok/s: "
              f"{many / one:.2f}x; max |dNLL| {diff:.1e}")
    print(f"loadavg at end {os.getloadavg()[0]:.2f} (other CPU load slows every arm)")


if __name__ == "__main__":
    main()
