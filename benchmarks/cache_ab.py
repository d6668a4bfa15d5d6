"""Decode-step cost of the SinkCache against the SinkCache of another git revision, interleaved.

For refactors of the cache: both caches are built on the same model, filled with the same random
tokens (N + 64, so both are full and evicting), and timed on the same single-token steps in
alternating blocks of 8 (the order flipping every round) in one process, so machine noise hits
both alike. Only the cache comes from the revision: the model, the scheduler
(``streamingllm.bench.interleave``) and the statistics are this tree's. Printed: median ms per
step of each and the ratio (this tree / the revision).
Run from the repository root (about 2 minutes on 2 CPU cores with the default model):

    . .venv/bin/activate && python benchmarks/cache_ab.py --rev c098f29 --sizes 256 1024 2048
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from streamingllm import SinkCache, load
from streamingllm.bench import arm_stats, interleave
from streamingllm.compat import cache_kwargs, vocab_size
from streamingllm.models import DEFAULT_MODEL

BLOCK = 8  # steps of one cache before the other takes over


def cache_class_at(rev: str, folder: Path):
    """``SinkCache`` of the package as it was at git revision ``rev`` (imported as ``streamingllm_ref``)."""
    archive = subprocess.run(["git", "archive", rev, "src/streamingllm"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "src" / "streamingllm").rename(folder / "streamingllm_ref")
    sys.path.insert(0, str(folder))
    from streamingllm_ref.cache import SinkCache as RefCache

    return RefCache


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", required=True, help="git revision whose cache is the reference")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048], help="cache sizes N (tokens)")
    p.add_argument("--rounds", type=int, default=12, help="rounds of 8 steps per cache (the first is warm-up)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    a = p.parse_args(argv)
    if a.rounds < 2:
        p.error("--rounds must be >= 2 (the first is warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        RefCache = cache_class_at(a.rev, Path(tmp))
        model, _ = load(a.model)
        gen = torch.Generator().manual_seed(0)
        print(f"{'size':>6}  {a.rev + ' ms':>12}  {'this tree ms':>12}  {'this / ' + a.rev:>14}")
        with torch.no_grad():
            for n in a.sizes:
                ids = torch.randint(0, vocab_size(model), (1, n + 64), generator=gen)
                caches = {"ref": RefCache(model, 4, n - 4), "new": SinkCache(model, 4, n - 4)}
                for c in caches.values():
                    for i in range(0, ids.shape[1], 256):
                        model(input_ids=ids[:, i : i + 256], **cache_kwargs(model, c))
                toks = torch.randint(0, vocab_size(model), (BLOCK * a.rounds, 1, 1), generator=gen)
                steps = {k: _stepper(model, c, toks) for k, c in caches.items()}
                stats = arm_stats(interleave(steps, BLOCK * (a.rounds - 1), BLOCK, warmup=BLOCK), baseline="ref")
                med = {k: s["median_ms"] for k, s in stats.items()}
                print(f"{n:>6}  {med['ref']:>12.2f}  {med['new']:>12.2f}  {stats['new']['vs_baseline']:>14.3f}",
                      flush=True)


def _stepper(model, cache, toks: torch.Tensor):
    """Step ``i`` of one cache: token ``toks[i]`` (the same for both caches)."""
    kw = cache_kwargs(model, cache)
    return lambda i: model(input_ids=toks[i], **kw)


if __name__ == "__main__":
    main()
