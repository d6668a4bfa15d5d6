"""Per-token decode time: SinkCache vs transformers' DynamicCache holding the same number of tokens.

A thin wrapper over :func:`streamingllm.bench.bench_decode` (the ``streaming`` and ``dense`` arms of
``streamingllm bench decode``), kept for its compact table. Run from the repository root:

    . .venv/bin/activate && PYTHONPATH=src python benchmarks/decode_speed.py --sizes 256 1024 2048 --steps 64

For each size N both caches hold N tokens before every timed step, so each step attends to N + 1 keys:

* sink: ``SinkCache(model, sink_size=4, window_size=N - 4)`` prefilled with N + 64 tokens, so it is
  full and evicts one token per step;
* dynamic: ``DynamicCache(config=model.config)`` filled with exactly N tokens; after every timed step
  it is cropped back to N tokens (``crop(-1)``, outside the timed region).

Single-token steps under ``torch.no_grad()``, timed one by one with ``time.perf_counter``. After a
warm-up, the arms are interleaved in blocks (the order alternating) so machine noise hits both alike.
Reported: median and p90 ms/token per arm, mean, and the ratio of medians (sink / dynamic; lower is
better). ``--compile`` runs the sink arm's steps prepared and compiled (``torch.compile``): the
``streaming-compiled`` arm of ``streamingllm bench decode``.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch

from streamingllm.bench import bench_decode, load_model, machine_info
from streamingllm.models import DEFAULT_MODEL

SINK = 4
BLOCK = 8  # steps per arm before switching to the other arm
COLS = ["size", "sink_ms", "sink_p90", "dynamic_ms", "dynamic_p90", "ratio", "sink_mean", "dynamic_mean", "ratio_mean"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048], help="tokens held by each cache")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per arm and size")
    p.add_argument("--warmup", type=int, default=8, help="untimed decode steps per arm and size")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--random-weights", action="store_true", help="the model's architecture with random weights")
    p.add_argument("--compile", action="store_true", help="sink arm: prepared steps through torch.compile")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if min(a.sizes) <= SINK or a.steps < 1 or a.warmup < 0:
        p.error(f"sizes must be > {SINK}, steps >= 1, warmup >= 0")
    t0 = time.perf_counter()
    model, _ = load_model(a.model, random_weights=a.random_weights)
    print(f"model {a.model} loaded in {time.perf_counter() - t0:.1f} s")
    print(f"machine: {machine_info(model, 'cpu')} | steps {a.steps} warmup {a.warmup} block {BLOCK} "
          "(other CPU load skews both arms)")
    print("  ".join(f"{c:>12}" for c in COLS))
    out = []

    sink_arm = "streaming-compiled" if a.compile else "streaming"

    def show(rows: list[dict]) -> None:
        by = {r["method"]: r for r in rows}
        s, d = by[sink_arm], by["dense"]
        r = {"size": s["size"], "sink_ms": s["median_ms"], "sink_p90": s["p90_ms"], "dynamic_ms": d["median_ms"],
             "dynamic_p90": d["p90_ms"], "ratio": s["median_ms"] / d["median_ms"], "sink_mean": s["mean_ms"],
             "dynamic_mean": d["mean_ms"], "ratio_mean": s["mean_ms"] / d["mean_ms"]}
        out.append(r)
        print("  ".join(f"{r[c]:>12d}" if c == "size" else f"{r[c]:>12.3f}" for c in COLS), flush=True)

    pending: list[dict] = []

    def on_row(row: dict) -> None:
        pending.append(row)
        if len(pending) == 2:
            show(pending[:])
            pending.clear()

    bench_decode(model, a.sizes, (sink_arm, "dense"), a.steps, a.warmup, sink_size=SINK, block=BLOCK, seed=a.seed,
                 progress=False, on_row=on_row)
    print("ms = median ms/token, p90 = 90th percentile; ratio = sink_ms / dynamic_ms (target <= 1.00)")
    print(f"total {time.perf_counter() - t0:.1f} s, loadavg at end {os.getloadavg()[0]:.2f}")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLS)
            w.writeheader()
            w.writerows({c: (int(r[c]) if c == "size" else round(r[c], 4)) for c in COLS} for r in out)


if __name__ == "__main__":
    main()
