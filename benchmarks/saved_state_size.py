"""Bytes a saved stream takes, per token held: this tree's ``SinkCache.state_dict`` against another
git revision's, on the same model and tokens; and whether the saved state continues exactly.

For each stream length, both caches (the revision's and this tree's) are fed the same random token
ids through the model; each ``state_dict()`` is written with ``torch.save`` (what ``/save`` and the
server's state dir write, less the small transcript), and this tree's also gzipped
(``Session.save(..., compress=True)``). This tree's state is then loaded into a fresh cache, and the
next token's logits of the restored and the live cache are compared (max |difference|; 0 is exact).
Run from the repository root (about a minute on 2 CPU cores):

    . .venv/bin/activate && python benchmarks/saved_state_size.py --rev 7d8a9df --tokens 200 3000
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_ab import cache_class_at  # noqa: E402

from streamingllm import SinkCache, load, prefill  # noqa: E402
from streamingllm.compat import cache_kwargs, vocab_size  # noqa: E402
from streamingllm.models import DEFAULT_MODEL  # noqa: E402


def saved_bytes(state: dict) -> tuple[int, int]:
    """Bytes of ``state`` written with ``torch.save``, and gzipped."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell(), len(gzip.compress(buffer.getbuffer(), compresslevel=6))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", required=True, help="git revision whose state_dict is the reference")
    p.add_argument("--tokens", type=int, nargs="+", default=[200, 3000], help="stream lengths (tokens)")
    p.add_argument("--sink-size", type=int, default=4)
    p.add_argument("--window-size", type=int, default=1020)
    p.add_argument("--model", default=DEFAULT_MODEL)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        RefCache = cache_class_at(a.rev, Path(tmp))
        model, _ = load(a.model)
        gen = torch.Generator().manual_seed(0)
        print(f"{'tokens':>7} {'held':>5} {a.rev + ' B/token':>16} {'this B/token':>13} {'gzipped':>8} "
              f"{'this / ' + a.rev:>14} {'restored max |dlogit|':>22}")
        with torch.no_grad():
            for n in a.tokens:
                ids = torch.randint(0, vocab_size(model), (1, n + 1), generator=gen)
                ref = RefCache(model, a.sink_size, a.window_size)
                new = SinkCache(model, a.sink_size, a.window_size)
                for cache in (ref, new):
                    prefill(model, cache, ids[:, :n])
                held = new.cached_tokens
                before, _ = saved_bytes(ref.state_dict())
                state = new.state_dict()
                after, zipped = saved_bytes(state)
                restored = SinkCache(model, a.sink_size, a.window_size)
                restored.load_state_dict(state)
                logits = [model(input_ids=ids[:, n:], **cache_kwargs(model, c)).logits for c in (new, restored)]
                print(f"{n:>7} {held:>5} {before / held:>16.0f} {after / held:>13.0f} {zipped / held:>8.0f} "
                      f"{after / before:>14.3f} {(logits[0] - logits[1]).abs().max().item():>22.1e}", flush=True)


if __name__ == "__main__":
    main()
