"""``streamingllm chat``: a multi-turn chat whose memory stays bounded by the cache."""

from __future__ import annotations

import sys

from .options import (add_cache_options, add_generation_options, add_model_options, add_parser,
                      check_generation_options, load_model)


def register(sub) -> None:
    c = add_parser(sub, "chat", "multi-turn chat; memory stays bounded by the cache however long the conversation")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--pin-system", action="store_true",
                   help="keep the whole system prompt as attention sinks: never evicted, however long the chat")
    c.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="a string that ends a reply (repeatable); the reply is shown up to it")
    add_model_options(c)
    add_cache_options(c)
    add_generation_options(c)
    c.set_defaults(run=run)


def run(args) -> int:
    from ..session import Session

    sampling = check_generation_options(args, min_new_tokens=1)
    model, tokenizer = load_model(args)
    session = Session(model, tokenizer, args.sink_size, args.window_size, system=args.system, sampling=sampling,
                      max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
                      min_new_tokens=args.min_new_tokens, stop=args.stop, pin_system=args.pin_system)
    cache, interactive = session.cache, sys.stdin.isatty()
    pinned = f", system prompt pinned ({session.pinned_tokens} tokens)" if session.pinned_tokens else ""
    print(f"streamingllm chat: {args.model}, cache {cache.sink_size}+{cache.window_size} tokens{pinned}. Ctrl-D to quit.",
          file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        print("bot> ", end="", flush=True)
        for piece in session.reply(line.strip()):
            sys.stdout.write(piece)
            sys.stdout.flush()
        fill = cache.cached_tokens / cache.max_cached_tokens
        print(f"\n[cache {cache.cached_tokens}/{cache.max_cached_tokens} tokens ({fill:.0%} full), "
              f"{cache.seen_tokens} seen]", file=sys.stderr, flush=True)
