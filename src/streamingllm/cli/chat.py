"""``streamingllm chat``: a multi-turn chat whose memory stays bounded by the cache."""

from __future__ import annotations

import os
import signal
import sys
import threading

from .options import (add_cache_options, add_compile_option, add_generation_options, add_model_options, add_parser,
                      check_generation_options, load_model, say)
from .remote import RemoteSession, ServerError


def register(sub) -> None:
    c = add_parser(sub, "chat", "multi-turn chat; memory stays bounded by the cache however long the conversation")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--pin-system", action="store_true",
                   help="keep the whole system prompt as attention sinks: never evicted, however long the chat")
    c.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="a string that ends a reply (repeatable); the reply is shown up to it")
    c.add_argument("--server", default=None, metavar="URL",
                   help="talk to a running 'streamingllm serve' at URL (e.g. http://127.0.0.1:8000) instead of "
                        "loading a model; the model, cache and --penalty-last-n are then the server's")
    c.add_argument("--api-key", default=os.environ.get("STREAMINGLLM_API_KEY"),
                   help="with --server: the server's API key (default: $STREAMINGLLM_API_KEY)")
    add_model_options(c)
    add_compile_option(c)
    add_cache_options(c)
    add_generation_options(c)
    c.set_defaults(run=run)


def run(args) -> int:
    sampling = check_generation_options(args, min_new_tokens=1)
    if args.server is not None:
        return _run_remote(args, sampling)
    from ..compiled import DecodeStep
    from ..session import Session

    model, tokenizer = load_model(args)
    session = Session(model, tokenizer, args.sink_size, args.window_size, system=args.system, sampling=sampling,
                      max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
                      min_new_tokens=args.min_new_tokens, stop=args.stop, pin_system=args.pin_system,
                      compile=DecodeStep(model, args.compile, on_compile=say))
    cache, interactive = session.cache, sys.stdin.isatty()
    if interactive:
        _line_editing()
    pinned = f", system prompt pinned ({session.pinned_tokens} tokens)" if session.pinned_tokens else ""
    print(f"streamingllm chat: {args.model}, cache {cache.sink_size}+{cache.window_size} tokens{pinned}. "
          "/help for commands, Ctrl-C stops a reply, Ctrl-D quits.", file=sys.stderr)
    return _loop(session, interactive)


def _run_remote(args, sampling) -> int:
    """The chat over a running ``streamingllm serve`` at ``args.server``: no model is loaded here."""
    session = RemoteSession(args.server, args.api_key, system=args.system, pin_system=args.pin_system,
                            sampling=sampling, max_new_tokens=args.max_new_tokens,
                            min_new_tokens=args.min_new_tokens, stop=args.stop)
    try:
        interactive = sys.stdin.isatty()
        if interactive:
            _line_editing()
        pinned = ", system prompt pinned" if args.pin_system and args.system else ""
        print(f"streamingllm chat: {session.model} at {session.url}, cache {session.sink_size}+{session.window_size} "
              f"tokens per session{pinned}. /help for commands, Ctrl-C stops a reply, Ctrl-D quits.", file=sys.stderr)
        return _loop(session, interactive)
    finally:
        session.close()


def _loop(session, interactive: bool) -> int:
    """Read lines until the end of input: /commands, or a user message whose reply is printed."""
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = ""
        except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
            print(file=sys.stderr)
            continue
        if not line:
            if interactive:
                print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            _command(session, line)
            continue
        print("bot> ", end="", flush=True)
        try:
            stopped = _reply(session, line)
        except ServerError as err:  # the server refused or broke this reply (--server); the chat goes on
            print(flush=True)
            print(f"error: {err}", file=sys.stderr, flush=True)
            continue
        if stopped:
            print(" [stopped]", end="", file=sys.stderr, flush=True)
        print(flush=True)  # the reply's newline goes with the reply (stdout), so piped output stays readable
        if stopped and isinstance(session, RemoteSession):
            _refresh(session)  # no final chunk came with the session's numbers
        print(_stats(session), file=sys.stderr, flush=True)


def _reply(session, line: str) -> bool:
    """Print the reply to ``line`` as it comes. Ctrl-C stops it between two tokens (never inside a
    forward pass, which would leave the cache half-written); what was shown stays in the
    conversation. Returns True when stopped.

    With --server, the stop closes the connection (the server cancels the reply); a second
    Ctrl-C stops waiting for the server's next token at once."""
    stop = threading.Event()
    remote = isinstance(session, RemoteSession)

    def interrupt(*_):
        if remote and stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, interrupt)
    reply = session.reply(line)
    try:
        for piece in reply:
            sys.stdout.write(piece)
            sys.stdout.flush()
            if stop.is_set():
                break
    except KeyboardInterrupt:
        if not remote:
            raise
    finally:
        reply.close()  # closes the turn in the cache
        signal.signal(signal.SIGINT, previous)
    return stop.is_set()


COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays; with --server, a new server session)",
    "/save FILE": "write the conversation and the cache's exact state to FILE",
    "/load FILE": "continue a conversation saved with /save (same model and cache sizes)",
    "/stats": "cache fill, tokens seen, turns",
    "/help": "this list",
}


def _command(session, line: str) -> None:
    """Run one /command; problems are reported on one line and the chat goes on."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr)
        elif name in ("/save", "/load"):
            if isinstance(session, RemoteSession):
                raise ValueError(f"{name} works in a local chat only: with --server the cache is on the server")
            if not arg:
                raise ValueError(f"{name} needs a file name: {name} FILE")
            (session.save if name == "/save" else session.load)(arg)
            print(f"[{'saved to' if name == '/save' else 'loaded'} {arg}; {_stats(session)[1:-1]}]", file=sys.stderr)
        elif name == "/stats":
            if isinstance(session, RemoteSession):
                session.refresh()
            print(_stats(session), file=sys.stderr)
        elif name == "/help":
            for usage, what in COMMANDS.items():
                print(f"  {usage:<11} {what}", file=sys.stderr)
        else:
            raise ValueError(f"unknown command {name}; one of {', '.join(c.split()[0] for c in COMMANDS)}")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)


def _stats(session) -> str:
    if isinstance(session, RemoteSession):  # the server session's numbers
        s = session.stats()
        cached, room, seen, turns = s["cached_tokens"], s["max_cached_tokens"], s["seen_tokens"], s["turns"]
        fill = cached / room if room else 0.0
        return f"[server cache {cached}/{room} tokens ({fill:.0%} full), {seen} seen, {turns} turns]"
    cache = session.cache
    fill = cache.cached_tokens / cache.max_cached_tokens
    turns = sum(m["role"] == "user" for m in session.messages)
    return (f"[cache {cache.cached_tokens}/{cache.max_cached_tokens} tokens ({fill:.0%} full), "
            f"{cache.seen_tokens} seen, {turns} turns]")


def _refresh(session: RemoteSession) -> None:
    """The server's current numbers, when it answers (they are only shown)."""
    try:
        session.refresh()
    except (ValueError, OSError):
        pass


def _line_editing() -> None:
    """Arrow keys, editing and history at the prompt (readline), where the platform has it."""
    try:
        import readline  # noqa: F401  (importing it is what turns line editing on for input())
    except ImportError:
        pass
