"""``streamingllm passkey``: a passkey hidden at a depth of a long stream, then asked for."""

from __future__ import annotations

import sys

from ..report import progress_bar, pyplot
from .options import add_model_options, add_parser, load_model, memory_from_args
from .recall import add_recall_options, encoder, reader_factory, stream_start

DESCRIPTION = """\
Hide a passkey at each --depths fraction of a --total-tokens filler stream, ask for it, and
score the answer, for each method at equal cache. A bounded cache retrieves the key while it is in
its window when the question comes, and cannot once it is evicted: StreamingLLM bounds memory, it
does not extend what the model remembers. Writes passkey.csv, passkey.png and a table."""


def register(sub) -> None:
    p = add_parser(sub, "passkey", "passkey retrieval against depth and cache size", DESCRIPTION)
    p.add_argument("--total-tokens", type=int, default=2048, help="stream length, key and question included")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9, 0.95],
                   help="where the key sits: 0 = the start, 1 = just before the question")
    p.add_argument("--trials", type=int, default=2, help="keys per depth")
    add_recall_options(p, "passkey_out")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..checks import ArgumentError, check_int
    from ..evals.passkey import run_passkey
    from ..evals.perplexity import make_settings
    from ..evals.recall_report import passkey_table, plot_passkey, write_passkey_csv

    check_int("total_tokens", args.total_tokens, 16)
    check_int("trials", args.trials, 1)
    bad = [d for d in args.depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ArgumentError("depths", "must be fractions in [0, 1]", bad[0])
    memory = memory_from_args(args) if "memory" in args.methods else None
    make_settings(args.methods, args.sink_size, cache_size=args.cache_size, memory=memory)
    pyplot()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args)
    settings = make_settings(args.methods, args.sink_size, cache_size=args.cache_size, memory=memory)
    encode, decode = encoder(tokenizer)
    total = len(settings) * len(args.depths) * args.trials
    with progress_bar(total, "passkey", unit="trial") as bar:
        results = run_passkey(reader_factory(model, args), settings, encode, decode, args.total_tokens, args.depths,
                              args.trials, args.seed, progress=bar.update, start=stream_start(tokenizer))
    print(passkey_table(results))
    written = [write_passkey_csv(results, args.out / "passkey.csv"),
               plot_passkey(results, args.out / "passkey.png",
                            f"passkey retrieval, {args.model}, {args.total_tokens} tokens")]
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0
