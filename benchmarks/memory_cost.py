"""What the memory of evicted blocks costs against StreamingLLM: prefill tokens/s and per-token decode
latency at growing stream lengths, in one interleaved run, and where its memory goes.

The caches (StreamingLLM 4+W, and the same plus a memory of blocks, looking up every forward and
every ``n`` forwards: ``--lookup-every``) read the same tokens of Austen
in turns: each step feeds one 256-token piece to one arm (the memory arm in lookups of its chunk
size), the arms alternating in blocks, so machine noise hits both alike. At each length in
``--lengths`` both then decode the same ``--decode`` single tokens, interleaved in blocks of 8.
Printed and written (CSV + PNG): prefill tok/s per segment, median ms per decoded token and the
ratio (to streaming), the working tensors' bytes (flat: what an accelerator would hold) and
the block store's bytes per 1,000 tokens (the growth off the accelerator). Run on a quiet machine
(about 10 minutes for 8K and 32K on 2 CPU cores):

    . .venv/bin/activate && python benchmarks/memory_cost.py --lengths 8192 32768 --out docs/bench/memory/cost
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from streamingllm import BlockMemory, MemoryCache, SinkCache, load, prefill
from streamingllm.bench import arm_stats, interleave
from streamingllm.compat import cache_kwargs
from streamingllm.evals.corpus import austen_text
from streamingllm.memory import rss_bytes
from streamingllm.models import DEFAULT_MODEL
from streamingllm.report import progress_bar, pyplot

PIECE = 256  # tokens per prefill step of either arm


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768], help="stream lengths to decode at (tokens)")
    p.add_argument("--window-size", type=int, default=1020, help="W of both caches (4 sinks)")
    p.add_argument("--decode", type=int, default=64, help="decoded tokens per arm at each length")
    p.add_argument("--lookup-every", type=int, nargs="+", default=[1, 4],
                   help="one memory arm per value: forwards between lookups")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=Path("memory_cost"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(a.model)
    text = austen_text()
    ids = tokenizer(text[: 6 * max(a.lengths)], add_special_tokens=False, return_tensors="pt").input_ids
    while ids.shape[1] < max(a.lengths):
        ids = torch.cat((ids, ids), dim=1)
    caches = {"streaming": SinkCache(model, 4, a.window_size)}
    for every in a.lookup_every:
        name = "memory" if every == 1 else f"memory/{every}"
        caches[name] = MemoryCache(model, 4, a.window_size, BlockMemory(lookup_every=every))
    fed = {k: 0 for k in caches}
    rows, done = [], 0
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), progress_bar(len(caches) * max(a.lengths) // PIECE, "prefill", unit="piece") as bar:
        for length in sorted(a.lengths):
            steps = (length - done) // PIECE

            def feeder(name):
                cache = caches[name]

                def step(i):
                    start = fed[name]
                    prefill(model, cache, ids[:, start : start + PIECE], chunk_size=PIECE)
                    fed[name] += PIECE
                    bar.update(1)
                return step

            pre = interleave({k: feeder(k) for k in caches}, steps, block=2)
            done = length
            toks = torch.randint(0, model.config.vocab_size, (a.decode + 8, 1, 1), generator=gen)
            dec = {k: _stepper(model, c, toks) for k, c in caches.items()}
            stats = arm_stats(interleave(dec, a.decode, 8, warmup=8), baseline="streaming")
            for name, cache in caches.items():
                memory_arm = name != "streaming"
                resident = cache.store_bytes()[0] if memory_arm else 0
                tensors = cache.accelerator_tensors() if memory_arm else cache.tensors()
                rows.append({
                    "arm": name, "tokens": length,
                    "prefill_tok_s": round(steps * PIECE / sum(pre[name]), 1),
                    "decode_ms": round(stats[name]["median_ms"], 2),
                    "decode_vs_streaming": round(stats[name]["vs_baseline"], 3),
                    "working_mib": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2),
                    "store_mib": round(resident / 2**20, 1),
                    "store_kib_per_1k_tokens": round(resident / 1024 / (length / 1000), 1),
                    "rss_mib": round((rss_bytes() or 0) / 2**20),
                })
            # the tokens decoded above are part of both streams now; the next segment reads on from here
    _write(rows, a.out)


def _stepper(model, cache, toks):
    kw = cache_kwargs(model, cache)
    return lambda i: model(input_ids=toks[i], position_ids=cache.position_ids(1), **kw)


def _write(rows: list[dict], out: Path) -> None:
    cols = list(rows[0])
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]!s:>14}" for c in cols))
    with open(out / "memory_cost.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        pts = [(r["tokens"], r["decode_ms"]) for r in rows if r["arm"] == arm]
        left.plot(*zip(*pts), marker="o", label=arm)
    left.set(xscale="log", xlabel="stream length (tokens)", ylabel="ms per decoded token", title="decode latency")
    left.legend()
    mem = [r for r in rows if r["arm"] == "memory"]
    right.plot([r["tokens"] for r in mem], [r["working_mib"] for r in mem], marker="o", label="working tensors (accelerator)")
    right.plot([r["tokens"] for r in mem], [r["store_mib"] for r in mem], marker="o", label="block store (CPU)")
    right.set(xscale="log", xlabel="stream length (tokens)", ylabel="MiB", title="memory of the memory arm")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "memory_cost.png", dpi=120)
    print(f"wrote {out / 'memory_cost.csv'}, {out / 'memory_cost.png'}")


if __name__ == "__main__":
    main()
