"""``streamingllm attention``: attention maps and sink statistics (the paper's Figure 2)."""

from __future__ import annotations

import sys
from pathlib import Path

from .options import add_parser

DESCRIPTION = """\
Run a text through one or more models with eager attention and write: maps.png (per-layer
attention averaged over heads over the first --map-tokens tokens, like the paper's Figure 2;
--heads adds heads.png for one layer), sinks.csv and sinks.png (per layer: the share of
attention on the first --k tokens and on the first token, against uniform attention), and a
table. --compare adds models (or checkpoints) to the statistics."""

DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
                "step. All that glitters is not gold. Where there is a will, there is a way.")


def register(sub) -> None:
    from ..models import DEFAULT_MODEL, DTYPES
    from ..precision import QUANTIZE

    p = add_parser(sub, "attention", "attention maps and attention-sink statistics per layer", DESCRIPTION)
    p.add_argument("text", nargs="?", default=None, help="the text (default: a few proverbs); '-' reads stdin")
    p.add_argument("--text-file", type=Path, help="read the text from this file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model (as for generate)")
    p.add_argument("--compare", nargs="+", default=[], metavar="MODEL",
                   help="more models or checkpoints to compare (each reads the text with its own tokenizer)")
    p.add_argument("--random-weights", action="store_true",
                   help="also a random-weight twin of --model (no sinks expected): a baseline")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and activations")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--quantize", default="none", choices=list(QUANTIZE), help="CPU: int8 linear weights (as for generate)")
    p.add_argument("--num-tokens", type=int, default=256, help="tokens of the text the statistics use")
    p.add_argument("--map-tokens", type=int, default=16, help="tokens shown in the maps")
    p.add_argument("--layers", type=int, nargs="+", help="layers in the maps (default: all, up to 16 evenly spread)")
    p.add_argument("--heads", type=int, metavar="LAYER", help="also draw every head of this layer")
    p.add_argument("--k", type=int, default=4, help="how many first tokens count as sinks")
    p.add_argument("--out", type=Path, default=Path("attention_out"), help="output folder")
    p.set_defaults(run=run)


def run(args) -> int:
    import numpy as np

    from ..checks import ArgumentError, check_int
    from ..evals.attention import capture, head_mean, layer_types, sink_statistics
    from ..evals.recall_report import plot_maps, plot_sinks, sink_table, write_sink_csv
    from ..models import load
    from ..report import progress_bar, pyplot
    from .generate import read_prompt
    from .options import model_label

    check_int("num_tokens", args.num_tokens, 2)
    check_int("map_tokens", args.map_tokens, 2)
    check_int("k", args.k, 1, args.num_tokens - 1)
    text = DEFAULT_TEXT if args.text is None and args.text_file is None else read_prompt(args.text, args.text_file)
    pyplot()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(args.model, args.dtype, args.device, quantize=args.quantize)
    ids = tokenizer(text, add_special_tokens=True).input_ids[: args.num_tokens]
    if len(ids) <= args.k:
        raise ArgumentError("k", f"must be smaller than the text's {len(ids)} tokens", args.k)
    label = model_label(args.model)
    runs = [(label, model, ids)]
    if args.random_weights:
        runs.append((f"{label} (random weights)",
                     load(args.model, args.dtype, args.device, random_weights=True, quantize=args.quantize)[0], ids))
    for name in args.compare:
        other, other_tokenizer = load(name, args.dtype, args.device, quantize=args.quantize)
        # each model reads the text as its own tokenizer writes it (a sink-token checkpoint's <sink> first)
        other_ids = ids if other_tokenizer is None else other_tokenizer(text).input_ids[: args.num_tokens]
        runs.append((model_label(name), other, other_ids))
    stats, written = [], []
    with progress_bar(len(runs), "attention", unit="model") as bar:
        for i, (name, m, run_ids) in enumerate(runs):
            attentions = capture(m, run_ids)
            stats.append(sink_statistics(attentions, args.k, name, layer_types(m)))
            if i == 0:
                maps = head_mean(attentions)
                n = min(args.map_tokens, len(ids))
                tokens = [tokenizer.decode([t]).replace("\n", "\\n") or "·" for t in ids[:n]]
                layers = args.layers or _spread(len(maps), 16)
                bad = [x for x in layers if not 0 <= x < len(maps)]
                if bad:
                    raise ArgumentError("layers", f"must be in 0..{len(maps) - 1}", bad[0])
                written.append(plot_maps(maps, tokens, args.out / "maps.png", layers,
                                         f"{name}: attention averaged over heads, first {n} tokens"))
                if args.heads is not None:
                    if not 0 <= args.heads < len(attentions):
                        raise ArgumentError("heads", f"must be a layer in 0..{len(attentions) - 1}", args.heads)
                    per_head = np.stack([h.numpy() for h in attentions[args.heads]])
                    written.append(plot_maps(per_head, tokens, args.out / "heads.png", None,
                                             f"{name}: every head of layer {args.heads}", panel="head"))
            bar.update(1)
    print(sink_table(stats))
    written += [write_sink_csv(stats, args.out / "sinks.csv"),
                plot_sinks(stats, args.out / "sinks.png", f"attention sinks over {len(ids)} tokens")]
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


def _spread(n: int, most: int) -> list[int]:
    """Up to ``most`` layers of ``n``, evenly spread, first and last included."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})
