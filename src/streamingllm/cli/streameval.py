"""``streamingllm streameval``: the paper's question answering on a stream (Figures 8-9)."""

from __future__ import annotations

import sys

from ..report import progress_bar, pyplot
from .options import add_model_options, add_parser, load_model, memory_from_args
from .recall import add_recall_options, encoder, reader_factory

DESCRIPTION = """\
A stream of lines "line <n>: REGISTER_CONTENT is <v>"; after every --query-every lines, a
question about the line --distances lines back, answered in the stream and scored by exact match;
for each method at equal cache. Accuracy against the tokens read and against the distance, as
tables, streameval.csv and streameval.png. --chat wraps each block and question in the chat
template (instruct models)."""


def register(sub) -> None:
    p = add_parser(sub, "streameval", "StreamEval: question answering over an endless stream of lines", DESCRIPTION)
    p.add_argument("--lines", type=int, default=400, help="lines in the stream")
    p.add_argument("--query-every", type=int, default=10, help="lines between questions")
    p.add_argument("--distances", type=int, nargs="+", default=[20], help="lines back the questions ask about, in turn")
    p.add_argument("--chat", action="store_true", help="chat-template mode (instruct models)")
    p.add_argument("--bucket-tokens", type=int, default=1024, help="tables and plot: accuracy per this many tokens read")
    add_recall_options(p, "streameval_out")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..checks import ArgumentError, check_int
    from ..evals.perplexity import make_settings
    from ..evals.recall_report import plot_streameval, streameval_tables, write_streameval_csv
    from ..evals.streameval import make_stream, run_streameval

    values, queries = make_stream(args.lines, args.query_every, args.distances, args.seed)
    check_int("bucket_tokens", args.bucket_tokens, 1)
    memory = memory_from_args(args) if "memory" in args.methods else None
    make_settings(args.methods, args.sink_size, cache_size=args.cache_size, memory=memory)
    pyplot()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise ArgumentError("chat", "needs a model whose tokenizer has a chat template")
    settings = make_settings(args.methods, args.sink_size, cache_size=args.cache_size, memory=memory)
    encode, decode = encoder(tokenizer)
    with progress_bar(len(settings) * len(queries), "streameval", unit="question") as bar:
        results = run_streameval(reader_factory(model, args), settings, encode, decode, values, queries,
                                 tokenizer if args.chat else None, args.query_every, progress=bar.update)
    print(streameval_tables(results, args.bucket_tokens))
    written = [write_streameval_csv(results, args.out / "streameval.csv"),
               plot_streameval(results, args.out / "streameval.png", args.bucket_tokens,
                               f"StreamEval, {args.model}, {args.lines} lines{', chat' if args.chat else ''}")]
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0
