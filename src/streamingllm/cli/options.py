"""Options shared by several commands, defined once: the model, its dtype and device, and the
help formatter that shows every default."""

from __future__ import annotations

import argparse

from ..models import DEFAULT_MODEL, DTYPES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default and keeps descriptions' line breaks."""


def add_parser(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared help formatter."""
    return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def add_model_options(p: argparse.ArgumentParser, random_weights: bool = False) -> None:
    """``--model``, ``--dtype``, ``--device`` (and ``--random-weights``, ``--seed`` when asked)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="the embedded default model, a transformers folder, a .gguf file or a hub id")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and activations")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps, ...")
    if random_weights:
        p.add_argument("--random-weights", action="store_true",
                       help="the model's architecture with random weights (no tokenizer, no gguf needed)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids")


def load_model(args):
    """``(model, tokenizer)`` from the options of :func:`add_model_options`."""
    from ..models import load

    return load(args.model, dtype=args.dtype, device=args.device,
                random_weights=getattr(args, "random_weights", False), seed=getattr(args, "seed", 0) or 0)
