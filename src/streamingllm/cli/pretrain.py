"""``streamingllm pretrain``: train the sink variants from scratch, then evaluate them (paper Table 3)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .options import add_parser

DESCRIPTION = """\
Train small Llama models from scratch on Jane Austen's novels (one held out) in up to four
variants with identical data, tokenizer, schedule and seed (paper Sec. 3.3):

{variants}

Each is saved in OUT/<variant>/ as an ordinary transformers checkpoint (--model OUT/<variant>
works with every command) with train_log.csv; OUT/loss_curves.png and .csv compare them. A
variant whose folder holds a finished run of the same configuration is reused, not retrained.

Then (unless --no-evaluate) each is scored on the held-out novel: streaming perplexity at
0+L, 1+(L-1), 2+(L-2) and 4+(L-4) (the paper's Table 3), dense attention past the trained
length, and attention-sink statistics; OUT/table3.csv/.md, dense.csv/.png, sinks.csv/.png."""


def register(sub) -> None:
    from ..evals.corpus import AUSTEN_NOVELS
    from ..train.recipe import PRESETS, VARIANTS

    variants = "\n".join(f"  {v.name:<12} {v.description}" for v in VARIANTS.values())
    p = add_parser(sub, "pretrain", "train models with and without attention sinks from scratch, and evaluate them",
                   DESCRIPTION.format(variants=variants))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                   help=f"one or more of {' '.join(VARIANTS)}")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS),
                   help="model and schedule: cpu (about 20 minutes a variant on 2 cores), gpu (a larger model "
                   "in bfloat16 on cuda), tiny (seconds; for tests); the flags below override it")
    p.add_argument("--out", type=Path, default=Path("pretrain_out"), help="run folder")
    g = p.add_argument_group("model and schedule (default: the preset's)")
    for flag, kind, text in (
            ("--steps", int, "optimiser steps"), ("--batch-size", int, "samples per step"),
            ("--seq-len", int, "tokens per sample: the trained length"),
            ("--hidden-size", int, "model width"), ("--intermediate-size", int, "MLP width"),
            ("--num-layers", int, "decoder layers"), ("--num-heads", int, "attention heads"),
            ("--num-kv-heads", int, "key/value heads"), ("--vocab-size", int, "BPE vocabulary size"),
            ("--learning-rate", float, "peak learning rate"), ("--warmup-steps", int, "warm-up steps"),
            ("--weight-decay", float, "AdamW weight decay on matrices"),
            ("--eval-every", int, "steps between validation losses"), ("--seed", int, "weights and sample order")):
        g.add_argument(flag, type=kind, help=text)
    g.add_argument("--held-out", choices=AUSTEN_NOVELS, help="the novel kept out of training (default persuasion)")
    g.add_argument("--device", help="torch device (default: the preset's)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="training precision (autocast)")
    e = p.add_argument_group("evaluation on the held-out novel")
    e.add_argument("--no-evaluate", action="store_true", help="train only")
    e.add_argument("--cache-size", type=int, help="streaming cache L = S + W (default: half the trained length)")
    e.add_argument("--sink-sizes", type=int, nargs="+", default=[0, 1, 2, 4], metavar="S",
                   help="sink sizes S of the streaming caches S + (L - S)")
    e.add_argument("--eval-tokens", type=int, default=20000, help="held-out tokens scored by streaming")
    e.add_argument("--dense-tokens", type=int, help="tokens scored by dense attention (default: 4x the trained "
                   "length), to see it past the trained length")
    e.add_argument("--chunk-size", type=int, default=256, help="tokens per forward pass while scoring")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


_FIELDS = ("steps", "batch_size", "seq_len", "hidden_size", "intermediate_size", "num_layers", "num_heads",
           "num_kv_heads", "vocab_size", "learning_rate", "warmup_steps", "weight_decay", "eval_every", "seed",
           "held_out", "device", "dtype")


def run(args) -> int:
    from ..models import resolve_device
    from ..report import pyplot
    from ..train import PRESETS, prepare_data, pretrain, variants_of
    from ..train.report import plot_losses, write_losses

    variants = variants_of(args.variants)
    config = PRESETS[args.preset].replace(**{f: getattr(args, f) for f in _FIELDS})
    evaluation = None
    if not args.no_evaluate:
        from ..evals.sink_pretraining import EvalPlan

        evaluation = EvalPlan.for_trained_length(config.seq_len, cache_size=args.cache_size,
                                                 sink_sizes=args.sink_sizes, eval_tokens=args.eval_tokens,
                                                 dense_tokens=args.dense_tokens, chunk_size=args.chunk_size)
    pyplot()  # the plots' extra, before the training rather than after
    command = "streamingllm " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("streamingllm") else None
    print(f"pretraining {', '.join(v.name for v in variants)} into {args.out}: {config}", file=sys.stderr)

    def done(result):
        state = "reused" if result.reused else f"trained in {result.seconds / 60:.1f} min"
        last = result.log[-1]
        print(f"{result.variant}: {state}; final loss {last['loss']:.3f}, validation {last['val_loss']:.3f} "
              f"-> {result.folder}", file=sys.stderr)

    resolve_device(config.device)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config, args.out)
    results = pretrain(variants, config, args.out, data=data, progress=not args.quiet, command=command,
                       on_done=done)
    written = [write_losses(results, args.out / "loss_curves.csv"),
               plot_losses(results, args.out / "loss_curves.png", config)]
    if evaluation is not None:
        from ..evals.recall_report import sink_table
        from ..evals.sink_pretraining import evaluate_checkpoints, write_report

        report = evaluate_checkpoints({r.variant: r.folder for r in results}, data.held_out_text, evaluation,
                                      progress=not args.quiet, device=config.device)
        print(report.table())
        plan = report.plan
        print(f"\nattention sinks per layer ({plan.stats_windows} windows of {plan.stats_tokens} held-out tokens):")
        print(sink_table([r.stats for r in report.rows]))
        written += write_report(report, args.out)
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0
