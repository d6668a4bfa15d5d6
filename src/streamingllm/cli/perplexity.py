"""``streamingllm perplexity``: a thin adapter over :mod:`streamingllm.evals` (perplexity, corpus, report).

Every option is checked by the library before the text is read or the model loaded; the
command line's ``main`` shows a bad value as one line naming its flag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..report import progress_bar, pyplot
from .options import add_memory_options, add_model_options, add_parser, load_model, memory_from_args, model_label
from ..families import trained_length
from ..evals.corpus import CORPORA, TextSource, check_window, tokenize_window
from ..evals.perplexity import (ALL_METHODS, AUTO_RECOMPUTE_TOKENS, METHODS, check_options, evaluate, make_settings, recompute_step,
                         sink_tokens, summarize)
from ..evals.report import format_summary, ordinal, plot_curves, plot_sweep, write_nll_csv, write_summary_csv

DESCRIPTION = """\
Score a long text with dense attention, window attention, sliding window with re-computation
and StreamingLLM (the paper's Sec. 4.1); write per-token NLL and a summary (CSV) and plots (PNG).

Each of window, recompute and streaming holds the same cache of L = S + W tokens."""


def unescape(text: str) -> str:
    """``\\n`` and ``\\t`` typed on a command line as a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _recompute_every(value: str) -> int | str:
    """``--recompute-every``: an integer where it is one, else the word (the library checks it)."""
    return int(value) if value.lstrip("-").isdigit() else value


def register(sub) -> None:
    """Add the ``perplexity`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = add_parser(sub, "perplexity", "per-token perplexity of dense, window, recompute and streaming attention on "
                   "long text", DESCRIPTION)
    src = p.add_argument_group("text (exactly one source)")
    src.add_argument("--text-file", nargs="+", action="extend", default=[], metavar="FILE",
                     help="text files, concatenated in order ('-' = stdin)")
    src.add_argument("files", nargs="*", help=argparse.SUPPRESS)  # the old spelling: files as positional arguments
    src.add_argument("--corpus", choices=CORPORA, metavar="CORPUS",
                     help="built-in corpus: austen (Jane Austen's six novels, fetched once from Debian) or "
                     "austen:NOVEL for one of them (e.g. austen:persuasion)")
    src.add_argument("--dataset", metavar="NAME", help="Hugging Face dataset id, e.g. emozilla/pg19 (needs `datasets` and the hub)")
    src.add_argument("--dataset-split", default="test", help="split of --dataset")
    src.add_argument("--dataset-field", default="text", help="text column of --dataset")
    src.add_argument("--offset", type=int, default=0, help="skip this many tokens of the text first")
    src.add_argument("--num-tokens", type=int, help="tokens of the text to score; all when not given")
    cache = p.add_argument_group("methods and caches")
    cache.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                       help=f"one or more of {' '.join(ALL_METHODS)} (memory: streaming plus a memory of evicted "
                       "blocks; not run unless named)")
    cache.add_argument("--sink-size", type=int, nargs="+", default=[4], metavar="S", help="attention sinks, one or more values")
    size = cache.add_mutually_exclusive_group()
    size.add_argument("--window-size", type=int, nargs="+", metavar="W",
                      help="recent tokens kept, one or more values (every S with every W)")
    size.add_argument("--cache-size", type=int, nargs="+", metavar="L",
                      help="total cache S+W, one or more values; W = L - S; 1024 when neither is given")
    cache.add_argument("--sink-text", metavar="TEXT", type=unescape,
                       help=r"use these tokens as the sinks instead of the text's first tokens, cycled to S tokens "
                       r"(e.g. '\n'); \n and \t are unescaped")
    run_ = p.add_argument_group("evaluation and output")
    run_.add_argument("--chunk-size", type=int, default=256, help="tokens per forward pass; results do not depend on it")
    run_.add_argument("--recompute-every", type=_recompute_every, default="auto", metavar="K",
                      help="recompute scores every K-th token only (it costs a forward of L+1 tokens per token); "
                      f"'auto' scores about {AUTO_RECOMPUTE_TOKENS} tokens, 1 scores all")
    run_.add_argument("--max-dense-tokens", type=int, default=65536, help="refuse dense on longer texts")
    run_.add_argument("--segment-tokens", type=int,
                      help="summary columns: perplexity per segment of this many tokens; quarters when not given")
    run_.add_argument("--smooth", type=int, default=256, help="plot: moving mean over this many tokens")
    run_.add_argument("--out", type=Path, default=Path("perplexity_out"), help="output folder")
    add_memory_options(p)
    add_model_options(p)
    p.set_defaults(run=run)


def _progress_bar(setting, total):
    return progress_bar(total, setting.label)


def run(args) -> int:
    """Check every option, read the text, load the model, score, print the summary, write the files."""
    source = TextSource(args.text_file + args.files, args.corpus, args.dataset, args.dataset_split, args.dataset_field)
    offset, num_tokens = check_window(args.offset, args.num_tokens)
    check_options(chunk_size=args.chunk_size, recompute_every=args.recompute_every,
                  max_dense_tokens=args.max_dense_tokens, segment_tokens=args.segment_tokens, smooth=args.smooth,
                  sink_text=args.sink_text)
    memory = memory_from_args(args) if "memory" in args.methods else None
    make_settings(args.methods, args.sink_size, args.window_size, args.cache_size, memory=memory)
    pyplot()  # the plots' extra, before hours of work rather than after
    args.out.mkdir(parents=True, exist_ok=True)
    text = source.read(None if num_tokens is None else offset + num_tokens)

    model, tokenizer = load_model(args)
    ids = tokenize_window(tokenizer, text, offset, num_tokens)
    sink_ids, sink_name = sink_tokens(tokenizer, args.sink_text) if args.sink_text is not None else (None, "")
    settings = make_settings(args.methods, args.sink_size, args.window_size, args.cache_size, sink_ids, sink_name,
                             memory)
    every = recompute_step(len(ids), args.recompute_every)
    trained = trained_length(model)
    n = len(settings)
    print(f"scoring {len(ids):,} tokens of {source.name} (offset {offset}) with {n} setting{'s' * (n > 1)}; "
          f"model {args.model}, trained length {trained}", file=sys.stderr)
    if every > 1 and any(s.method == "recompute" for s in settings):
        print(f"recompute: scoring every {ordinal(every)} token only (--recompute-every {every}): each costs a "
              "forward of L+1 tokens", file=sys.stderr)
    results = evaluate(model, ids, settings, chunk_size=args.chunk_size, recompute_every=every,
                       max_dense_tokens=args.max_dense_tokens, progress_factory=_progress_bar)

    summary = summarize(results, len(ids), args.segment_tokens)
    print(format_summary(summary))
    title = f"{model_label(args.model)} on {source.name}: {len(ids):,} tokens"
    written = [write_nll_csv(results, args.out / "nll.csv"), write_summary_csv(summary, args.out / "summary.csv"),
               plot_curves(results, args.out / "curves.png", smooth=args.smooth, trained_length=trained, title=title)]
    if plot_sweep(results, args.out / "sweep.png", title=title):
        written.append(args.out / "sweep.png")
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0
