"""``streamingllm generate``: continue a prompt, streaming tokens to stdout however long."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..checks import ArgumentError
from .options import (CommandError, add_cache_options, add_generation_options, add_model_options,
                      add_parser, check_generation_options, check_trained_length, load_model, say)

STATS_EVERY = 256  # tokens between --stats lines


def register(sub) -> None:
    g = add_parser(sub, "generate", "continue a prompt, streaming tokens to stdout however long the output")
    g.add_argument("prompt", nargs="?", help="the prompt text; '-' or omitted reads stdin")
    g.add_argument("--text-file", type=Path, metavar="FILE", help="read the prompt from this file")
    g.add_argument("--prompt-file", type=Path, dest="text_file", help=argparse.SUPPRESS)  # the old name
    g.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user turn of the chat template")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn tokens (with --chat-template; the model then "
                   "writes turns of its own: --min-new-tokens suppresses the end of turn instead)")
    g.add_argument("--fast-prefill", action="store_true", help="plain causal mask inside prompt chunks (approximate)")
    g.add_argument("--stats", action="store_true",
                   help=f"print prefill and decode speed, cache fill and resident memory to stderr every {STATS_EVERY} tokens")
    add_model_options(g, compile=True)
    add_cache_options(g)
    add_generation_options(g)
    g.set_defaults(run=run)


def read_prompt(prompt: str | None, text_file: Path | None) -> str:
    """The prompt from the argument, the file ``--text-file``, or stdin (said on a terminal, where it would wait)."""
    if text_file is not None:
        if prompt is not None:
            raise ArgumentError("text_file", "cannot be combined with a prompt argument: give one of them")
        try:
            text = text_file.read_text(encoding="utf-8")
        except OSError as err:
            raise ArgumentError("text_file", f"cannot read {text_file}: {err.strerror}") from err
    elif prompt is None or prompt == "-":
        if sys.stdin.isatty():
            print("streamingllm: reading the prompt from stdin; end it with Ctrl-D (or give it as an argument)",
                  file=sys.stderr, flush=True)
        text = sys.stdin.read()
    else:
        text = prompt
    if not text.strip():
        raise CommandError("the prompt is empty: give some text (argument, --text-file or stdin)")
    return text


def run(args) -> int:
    from ..cache import SinkCache
    from ..compiled import DecodeStep
    from ..feed import generate_tokens
    from ..memory import MIB, rss_bytes, storage_bytes
    from ..report import progress_bar
    from ..session import TextDecoder, stop_token_ids

    sampling = check_generation_options(args)  # every flag is checked before the model is loaded
    text = read_prompt(args.prompt, args.text_file)
    check_trained_length(args)
    model, tokenizer = load_model(args)
    check_trained_length(args, model)
    cache = SinkCache(model, sink_size=args.sink_size, window_size=args.window_size)
    if args.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ArgumentError("chat_template", "needs a model whose tokenizer has a chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    stops = stop_token_ids(tokenizer) if args.chat_template and not args.ignore_eos else frozenset()
    bar = progress_bar(len(ids), "prefill", enabled=len(ids) > args.chunk_size, leave=False)
    clock = {"start": time.perf_counter()}

    def prefilled(done: int) -> None:
        bar.update(done - bar.n)
        clock["prefill_end"] = time.perf_counter()

    def status(count: int) -> str:
        now = time.perf_counter()
        decode_s = now - clock["prefill_end"]
        rate = (count - 1) / decode_s if count > 1 and decode_s > 0 else float("nan")
        rss = rss_bytes()
        return (f"decode {count} tokens, {rate:.1f} tok/s, cache {cache.cached_tokens}/{cache.max_cached_tokens} "
                f"tokens ({storage_bytes(cache) / MIB:.2f} MiB), seen {cache.seen_tokens}, "
                f"RSS {'unknown' if rss is None else f'{rss / MIB:.0f} MiB'}")

    decoder, count = TextDecoder(tokenizer), 0
    for token in generate_tokens(model, cache, ids, args.max_new_tokens, sampling, stops, chunk_size=args.chunk_size,
                                 exact_prefill=not args.fast_prefill, prefill_progress=prefilled,
                                 min_new_tokens=min(args.min_new_tokens, args.max_new_tokens),
                                 compile=DecodeStep(model, args.compile, on_compile=say)):
        if count == 0:
            bar.close()
            if args.stats:
                seconds = clock["prefill_end"] - clock["start"]
                print(f"[prefill {len(ids)} tokens in {seconds:.2f} s, {len(ids) / seconds:.1f} tok/s]",
                      file=sys.stderr, flush=True)
        count += 1
        sys.stdout.write(decoder.add(int(token[0])))
        sys.stdout.flush()
        if args.stats and count % STATS_EVERY == 0:
            print(f"\n[{status(count)}]", file=sys.stderr, flush=True)
    bar.close()
    sys.stdout.write("\n")
    if args.stats and count:
        print(f"[done: {status(count)}]", file=sys.stderr)
    return 0
