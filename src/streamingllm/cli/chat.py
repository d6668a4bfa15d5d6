"""``streamingllm chat``: a multi-turn chat whose memory stays bounded by the cache.

The chat runs on a :class:`~streamingllm.client.Conversation`: a local
:class:`~streamingllm.session.Session`, or a :class:`~streamingllm.client.RemoteSession` with
``--server``. Only opening it differs; the loop asks the conversation what it can do.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from ..checks import ArgumentError
from ..client import Conversation, ServerError
from .options import (CommandError, add_cache_options, add_conversation_memory_options, add_generation_options,
                      add_model_options, add_parser, check_generation_options, check_trained_length, load_model,
                      memory_from_args, say)


def register(sub) -> None:
    summary = "multi-turn chat; memory stays bounded by the cache however long the conversation"
    c = add_parser(sub, "chat", summary, f"{summary}.\n\n{_commands_help()}")
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
    c.add_argument("--session", default=None, metavar="ID",
                   help="with --server: continue this server session (its id is printed when a chat ends; the "
                        "server keeps it, across restarts with its --state-dir)")
    add_model_options(c, compile=True)
    add_cache_options(c)
    add_conversation_memory_options(c)
    add_generation_options(c, chat=True)
    c.set_defaults(run=run)


class Opened(NamedTuple):
    """A conversation ready to chat on, and how to present it."""

    conversation: Conversation
    banner: str  # the first line on stderr: the model and the cache
    cache_name: str  # how the stats lines name the cache


def run(args) -> int:
    sampling = check_generation_options(args, min_new_tokens=1)
    if args.session is not None and args.server is None:
        raise ArgumentError("session", "needs --server URL (a local chat is continued with /save and /load)",
                            args.session)
    with (_connect if args.server is not None else _load)(args, sampling) as opened:
        interactive = sys.stdin.isatty()
        if interactive:
            _line_editing()
        print(f"{opened.banner}. /help for commands, Ctrl-C stops a reply, Ctrl-D or /quit quits.", file=sys.stderr)
        return _loop(opened.conversation, opened.cache_name, interactive)


@contextmanager
def _load(args, sampling) -> Iterator[Opened]:
    """A local :class:`~streamingllm.session.Session` on the model of ``--model``."""
    from ..compiled import DecodeStep
    from ..session import Session

    check_trained_length(args)
    memory = memory_from_args(args, only_if_asked=True)  # bad memory options fail before the weights load
    model, tokenizer = load_model(args, chat=True)  # a model without a chat template is refused before its weights
    check_trained_length(args, model)
    session = Session(model, tokenizer, args.sink_size, args.window_size, system=args.system, sampling=sampling,
                      max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
                      min_new_tokens=args.min_new_tokens, stop=args.stop, pin_system=args.pin_system,
                      compile=DecodeStep(model, args.compile, on_compile=say), memory=memory, evict=args.evict)
    cache = session.cache
    pinned = f", system prompt pinned ({session.pinned_tokens} tokens)" if session.pinned_tokens else ""
    extra = (f", memory of blocks ({memory.top_k} x {memory.block_size} tokens retrieved)" if memory else "") + (
        ", evicting whole turns" if args.evict == "turns" else "")
    banner = f"streamingllm chat: {args.model}, cache {cache.sink_size}+{cache.window_size} tokens{pinned}{extra}"
    yield Opened(session, banner, "cache")


@contextmanager
def _connect(args, sampling) -> Iterator[Opened]:
    """A conversation held by the running ``streamingllm serve`` at ``--server`` (a new server
    session, or ``--session``'s): no model is loaded here. The server session is kept when the
    chat ends, and its id printed, so that ``--session`` continues it."""
    from ..client import RemoteSession, server_url

    try:
        server_url(args.server)
    except ArgumentError as err:  # the library names its parameter, url; here it is --server
        raise ArgumentError("server", err.requirement, args.server) from None
    if args.memory or args.evict != "tokens":
        raise ArgumentError("memory" if args.memory else "evict", "is the server's setting with --server: start "
                            "`streamingllm serve --memory` (or --evict turns) instead")
    if args.session is not None and args.system is not None:
        raise ArgumentError("system", "cannot be combined with --session: the session keeps its own system prompt")
    remote = RemoteSession(args.server, args.api_key, system=args.system, pin_system=args.pin_system,
                           sampling=sampling, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                           stop=args.stop, session_id=args.session)
    remote.keep()
    pinned = ", system prompt pinned" if remote.pin_system and remote.system else ""
    turns = sum(m.get("role") == "user" for m in remote.messages)
    continued = (f", continuing session {remote.session_id} ({turns} turn{'s' * (turns != 1)} so far)"
                 if args.session else "")
    try:
        yield Opened(remote, f"streamingllm chat: {remote.model} at {remote.url}, cache {remote.sink_size}+"
                             f"{remote.window_size} tokens per session{pinned}{continued}", "server cache")
    finally:
        sid = remote.session_id
        remote.close()
        print(f"[server session {sid} kept; continue it with --server {remote.url} --session {sid}]",
              file=sys.stderr, flush=True)


def _read_line(interactive: bool) -> str | None:
    """The next input line, or None at the end of input (Ctrl-D, or the end of a pipe). An empty
    line is ``""``: only the end of input ends the chat, never an empty line."""
    if not interactive:
        line = sys.stdin.readline()
        return line if line else None
    try:
        return input("you> ")
    except EOFError:
        print(file=sys.stderr)
        return None


def _loop(chat: Conversation, cache_name: str, interactive: bool) -> int:
    """Read lines until the end of input or /quit: /commands, or a user message whose reply is
    printed. Empty lines are skipped."""
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
            print(file=sys.stderr)
            continue
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.split()[0] in QUIT:
            return 0
        if line.startswith("/"):
            _command(chat, cache_name, line)
            continue
        print("bot> ", end="", flush=True)
        try:
            stopped = _reply(chat, line)
        except ServerError as err:  # a server refused or broke this reply; the conversation is as it was
            print(flush=True)
            print(f"error: {err}", file=sys.stderr, flush=True)
            continue
        if stopped:
            print(" [stopped]", end="", file=sys.stderr, flush=True)
        print(flush=True)  # the reply's newline goes with the reply (stdout), so piped output stays readable
        print(_stats(chat, cache_name, refresh=stopped), file=sys.stderr, flush=True)


def _reply(chat: Conversation, line: str) -> bool:
    """Print the reply to ``line`` as it comes. Ctrl-C stops it between two pieces; what was shown
    stays in the conversation. Returns True when stopped.

    Where the conversation is interruptible (a server's), a second Ctrl-C stops waiting for the
    next piece at once; otherwise a reply is never interrupted inside a forward pass, which would
    leave the cache half-written."""
    stop = threading.Event()

    def interrupt(*_):
        if chat.interruptible and stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, interrupt)
    reply = chat.reply(line)
    try:
        for piece in reply:
            sys.stdout.write(piece)
            sys.stdout.flush()
            if stop.is_set():
                break
    except KeyboardInterrupt:
        if not chat.interruptible:
            raise
    finally:
        reply.close()  # closes the turn (in the cache, or on the server)
        signal.signal(signal.SIGINT, previous)
    return stop.is_set()


COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays; with --server, a new server session)",
    "/save FILE": "write the conversation and the cache's exact state to FILE",
    "/load FILE": "continue a conversation saved with /save (same model and cache sizes)",
    "/stats": "cache fill, tokens seen, turns",
    "/help": "this list",
    "/quit": "end the chat (also /exit, or Ctrl-D)",
}
QUIT = ("/quit", "/exit")


def _commands_help() -> str:
    """The chat's commands as ``chat --help`` and ``/help`` list them."""
    lines = [f"  {usage:<11} {what}" for usage, what in COMMANDS.items()]
    return "\n".join(["commands in the chat (Ctrl-C stops a reply; an empty line does nothing):", *lines])


def _command(chat: Conversation, cache_name: str, line: str) -> None:
    """Run one /command; problems are reported on one line and the chat goes on."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name == "/reset":
            chat.reset()
            print("[conversation reset]", file=sys.stderr)
        elif name in ("/save", "/load"):
            if not chat.can_save:
                raise CommandError(f"{name} works in a local chat only: with --server the cache is on the server")
            if not arg:
                raise CommandError(f"{name} needs a file name: {name} FILE")
            (chat.save if name == "/save" else chat.load)(arg)
            print(f"[{'saved to' if name == '/save' else 'loaded'} {arg}; {_stats(chat, cache_name)[1:-1]}]",
                  file=sys.stderr)
        elif name == "/stats":
            print(_stats(chat, cache_name, refresh=True), file=sys.stderr)
        elif name == "/help":
            print(_commands_help(), file=sys.stderr)
        else:
            raise CommandError(f"unknown command {name}; one of {', '.join(c.split()[0] for c in COMMANDS)}")
    # What the commands document: a file that cannot be written or read (OSError), one that holds
    # no conversation for this cache (ValueError), a server that refuses (ServerError).
    except (CommandError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)


def _stats(chat: Conversation, cache_name: str, refresh: bool = False) -> str:
    """The stats line; with ``refresh``, the numbers asked again where they are kept elsewhere (the
    last known ones when that fails: they are only shown)."""
    try:
        s = chat.stats(refresh=refresh)
    except (ServerError, OSError):
        s = chat.stats()
    cached, room = s["cached_tokens"], s["max_cached_tokens"]
    fill = cached / room if room else 0.0
    return f"[{cache_name} {cached}/{room} tokens ({fill:.0%} full), {s['seen_tokens']} seen, {s['turns']} turns]"


def _line_editing() -> None:
    """Arrow keys, editing and history at the prompt (readline), where the platform has it."""
    try:
        import readline  # noqa: F401  (importing it is what turns line editing on for input())
    except ImportError:
        pass
