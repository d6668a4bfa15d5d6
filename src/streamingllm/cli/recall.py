"""Options shared by ``streameval`` and ``passkey``: the methods and caches they compare, and
the readers that run them on a loaded model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evals.perplexity import ALL_METHODS, METHODS
from .options import add_memory_options


def add_recall_options(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                   help=f"one or more of {' '.join(ALL_METHODS)} (memory: streaming plus a memory of evicted "
                   "blocks; not run unless named)")
    p.add_argument("--sink-size", type=int, nargs="+", default=[4], metavar="S", help="attention sinks (streaming)")
    p.add_argument("--cache-size", type=int, nargs="+", default=[512], metavar="L",
                   help="total cache per method (window and recompute: L recent tokens; streaming: S + W = L)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per forward when reading")
    p.add_argument("--max-dense-tokens", type=int, default=16384, help="dense stops past this many tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the values and keys")
    p.add_argument("--out", type=Path, default=Path(default_out), help="output folder")
    add_memory_options(p)


def reader_factory(model, args):
    """``setting -> Reader`` for the loaded model."""
    from ..evals.readers import make_reader

    return lambda setting: make_reader(model, setting, args.chunk_size, args.max_dense_tokens)


def stream_start(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer begins a text with its ``<bos>`` token (Gemma's does, and reads
    text after it), else nothing: how a stream begins."""
    bos = getattr(tokenizer, "bos_token_id", None)
    first = tokenizer("a").input_ids[:1]
    return [bos] if bos is not None and first == [bos] else []


def encoder(tokenizer):
    """``(encode, decode)``: text <-> token ids without special tokens added."""
    return (lambda text: tokenizer(text, add_special_tokens=False).input_ids,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
