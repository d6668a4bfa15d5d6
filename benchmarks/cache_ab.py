"""Decode-step cost of the SinkCache against the SinkCache of another git revision, interleaved.

For refactors of the cache: both caches are built on the same model, filled with the same random
tokens (N + 64, so both are full and evicting), and timed on the same single-token steps in
alternating blocks of 8 (the order flipping every round) in one process, so machine noise hits
both alike. Printed: median ms per step of each and the ratio (this tree / the revision).
Run from the repository root (about 2 minutes on 2 CPU cores with the default model):

    . .venv/bin/activate && python benchmarks/cache_ab.py --rev c098f29 --sizes 256 1024 2048
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from streamingllm import SinkCache, load
from streamingllm.compat import cache_kwargs, vocab_size
from streamingllm.models import DEFAULT_MODEL


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
                toks = torch.randint(0, vocab_size(model), (16 * a.rounds, 1, 1), generator=gen)
                times = {k: [] for k in caches}
                for r in range(a.rounds):
                    for k in (("ref", "new") if r % 2 == 0 else ("new", "ref")):
                        kw = cache_kwargs(model, caches[k])
                        for _ in range(8):
                            t0 = time.perf_counter()
                            model(input_ids=toks[len(times[k])], **kw)
                            times[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v[8:]) * 1e3 for k, v in times.items()}
                print(f"{n:>6}  {med['ref']:>12.2f}  {med['new']:>12.2f}  {med['new'] / med['ref']:>14.3f}", flush=True)


if __name__ == "__main__":
    main()
