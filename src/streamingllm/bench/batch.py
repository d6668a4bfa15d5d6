"""Batched decode: one step of B independent streams at once against one stream at a time.

Each stream has a full, evicting :class:`~streamingllm.cache.SinkCache` of N tokens (its own
random prompt), and a step feeds every stream one token through
:func:`~streamingllm.feed.decode_rows`, which runs the streams in one forward where the family
allows it (the server's batched decode). The batch sizes are the arms of one interleaved run
(:mod:`.schedule`) per cache size, on the same token ids; throughput is compared with the
smallest batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..cache import SinkCache
from ..checks import check_int, check_int_list
from ..compat import vocab_size
from ..feed import decode_rows
from ..report import progress_bar
from .arms import Forward
from .decode import FILL_EXTRA, check_sizes
from .roofline import copy_bandwidth, kv_bytes, weight_bytes
from .schedule import interleave
from .stats import arm_stats

BATCH_COLUMNS = ["size", "batch", "stacked", "steps", "median_ms", "p90_ms", "p99_ms", "mean_ms", "step_ratio",
                 "tokens_per_s", "speedup", "limit_ms", "vs_limit"]


def check_batch_args(sizes, batch=(1, 2, 4, 8), steps: int = 64, warmup: int = 8, sink_size: int = 4,
                     block: int = 8) -> dict:
    """Validate :func:`bench_batch`'s arguments (no model needed); returns them normalised.

    Raises :class:`~streamingllm.checks.ArgumentError` (a ``ValueError``; ``TypeError`` for a
    wrong type) naming the parameter.
    """
    sizes, sink_size = check_sizes(sizes, sink_size)
    return dict(sizes=sizes, batch=sorted(check_int_list("batch", batch, 1)), steps=check_int("steps", steps, 1),
                warmup=check_int("warmup", warmup, 0), sink_size=sink_size, block=check_int("block", block, 1))


@torch.no_grad()
def bench_batch(model, batch: Sequence[int] = (1, 2, 4, 8), sizes: Sequence[int] = (256,), steps: int = 64,
                warmup: int = 8, sink_size: int = 4, block: int = 8, seed: int = 0, progress: bool = True,
                on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Latency and throughput of one decode step of B streams, for each batch size B and cache size N.

    Args:
        model: a causal LM (any family :class:`~streamingllm.cache.SinkCache` supports) on its device.
        batch: batch sizes B (streams per step, each >= 1; sorted, the smallest is the baseline).
        sizes: cache sizes N of every stream (tokens; each > ``sink_size``). Each stream is fed
            N + 64 random tokens first, so its cache is full and evicting when timed.
        steps: timed steps per batch size and cache size.
        warmup: untimed steps per batch size and cache size, before the timed ones.
        sink_size: attention sinks of each stream's cache (tokens).
        block: steps a batch size runs before the next takes over; the order rotates every round.
        seed: seed of the random token ids, the same for every batch size (stream r of every
            batch size gets the same prompt and the same tokens).
        progress: show a progress bar on stderr.
        on_row: called with each row as soon as its cache size is measured.

    Returns:
        One row per (size, batch) with :data:`BATCH_COLUMNS`: ``stacked`` (B > 1 and the streams
        shared one forward; False too where the family runs them one after the other), ``steps`` (timed),
        ``median_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms`` (one step of all B streams, ms),
        ``step_ratio`` (median over the smallest batch's median), ``tokens_per_s`` (B / median),
        ``speedup`` (tokens_per_s over the smallest batch's), ``limit_ms`` (the step's
        memory-bandwidth limit: the weights read once and every stream's N + 1 keys and values
        once, at the measured copy bandwidth: :mod:`.roofline`) and ``vs_limit`` (median / limit).
    """
    a = check_batch_args(sizes, batch, steps, warmup, sink_size, block)
    fwd, gen, vocab, most = Forward(model), torch.Generator().manual_seed(seed), vocab_size(model), max(a["batch"])
    bandwidth = copy_bandwidth(model.device)
    bar = progress_bar(len(a["sizes"]) * len(a["batch"]) * (a["steps"] + a["warmup"]), "batch", "step", progress)
    rows = []
    try:
        for n in a["sizes"]:
            prompts = torch.randint(0, vocab, (most, n + FILL_EXTRA), generator=gen).to(model.device)
            toks = torch.randint(0, vocab, (a["warmup"] + a["steps"], most), generator=gen).to(model.device)
            streams = {}
            for b in a["batch"]:
                bar.set_description(f"batch N={n} fill B={b}")
                streams[b] = [SinkCache(model, sink_size=a["sink_size"], window_size=n - a["sink_size"])
                              for _ in range(b)]
                for r, cache in enumerate(streams[b]):
                    fwd.feed(cache, prompts[r : r + 1])
            bar.set_description(f"batch N={n}")
            times = interleave({b: _stepper(model, caches, toks) for b, caches in streams.items()}, a["steps"],
                               a["block"], warmup=a["warmup"], sync=fwd.sync, on_step=lambda b: bar.update(1))
            stats = arm_stats(times, baseline=a["batch"][0])
            base_rate = a["batch"][0] / stats[a["batch"][0]]["median_ms"]
            for b, s in stats.items():
                limit = 1000 * (weight_bytes(model) + b * kv_bytes(model, n + 1)) / bandwidth
                rows.append({"size": n, "batch": b, "stacked": b > 1 and all(c.can_stack for c in streams[b]),
                             "steps": s["n"], "median_ms": s["median_ms"], "p90_ms": s["p90_ms"], "p99_ms": s["p99_ms"],
                             "mean_ms": s["mean_ms"], "step_ratio": s["vs_baseline"],
                             "tokens_per_s": 1e3 * b / s["median_ms"], "speedup": b / s["median_ms"] / base_rate,
                             "limit_ms": limit, "vs_limit": s["median_ms"] / limit})
                if on_row is not None:
                    on_row(rows[-1])
            streams = None  # freed before the next size's caches are filled
    finally:
        bar.close()
    return rows


def _stepper(model, caches: list[SinkCache], toks: torch.Tensor) -> Callable[[int], None]:
    """Call ``i`` of a batch size: one token to each of its streams (stream r gets ``toks[i, r]``)."""
    return lambda i: decode_rows(model, caches, toks[i, : len(caches)])
