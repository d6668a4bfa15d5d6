"""``streamingllm serve``: an OpenAI-compatible server with one sink cache per conversation."""

from __future__ import annotations

import os
import sys

from .options import add_cache_options, add_conversation_memory_options, add_model_options, add_parser, memory_from_args

DESCRIPTION = """\
An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models), streamed
or not, with a chat page at /, /health and Prometheus /metrics. Conversations keep their cache
between requests under a session id (POST /v1/sessions, then "session_id" in the request body
or an X-Session-Id header): each request feeds only the messages it adds. See docs/serving.md."""


def register(sub) -> None:
    s = add_parser(sub, "serve", "an OpenAI-compatible server; memory per conversation stays bounded", DESCRIPTION)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    s.add_argument("--api-key", default=os.environ.get("STREAMINGLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $STREAMINGLLM_API_KEY)")
    s.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated names the Host header may give; others get 400, so DNS rebinding "
                        "cannot reach the server ('*': any, '*.example.org': its subdomains; default: --host, "
                        "localhost, 127.0.0.1, ::1)")
    s.add_argument("--state-dir", default=None,
                   help="save every session here after each turn; evicted and restarted sessions come back exactly "
                        "(the same as --session-store DIR; one server process per directory)")
    s.add_argument("--session-store", default=None, metavar="URL_OR_DIR",
                   help="where every turn is saved before it is answered: a directory (as --state-dir), or "
                        "redis://host:port/db (rediss:// for TLS) shared by several servers or --replicas, each "
                        "session continued exactly by whichever holds its lease; per turn Redis gets what the "
                        "turn changed, not the whole cache (needs the 'replicas' extra)")
    s.add_argument("--lease-ttl", type=float, default=10.0, metavar="SECONDS",
                   help="with a Redis store: how long a server's lease on a session lasts unless renewed (every "
                        "third of it); a server that dies holds its sessions this long before another takes them")
    s.add_argument("--max-sessions", type=int, default=64, help="sessions held in memory (LRU eviction beyond)")
    s.add_argument("--max-sessions-known", type=int, default=1024,
                   help="sessions that may exist at once, in memory or saved (POST /v1/sessions gets 429 beyond)")
    s.add_argument("--session-ttl", type=float, default=86400.0,
                   help="seconds a session may stay idle before it expires, in memory and in the store (0: never)")
    s.add_argument("--max-cache-mib", type=float, default=None,
                   help="MiB of cache in memory, all sessions together (default: no limit beyond --max-sessions)")
    s.add_argument("--max-batch", type=int, default=8, help="requests generating at once, batched per step")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond --max-batch before 503")
    s.add_argument("--max-prompt-tokens", type=int, default=65536, help="tokens one request may add (413 beyond)")
    s.add_argument("--max-tokens", type=int, default=512, help="reply limit when a request gives none")
    s.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the most a request may ask for as max_tokens, max_completion_tokens or min_tokens (400 beyond)")
    d = s.add_argument_group(
        "sampling defaults", "what a request gets for each setting it leaves unset (one it sets is used exactly). "
        "Default: the model's generation_config when it recommends sampling, else llama.cpp's server's: "
        "temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition penalty 1.1 over the last 64 tokens. "
        "GET /health shows them")
    d.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    d.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (0 = all)")
    d.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    d.add_argument("--min-p", type=float, default=None,
                   help="keep tokens at least this many times as likely as the most likely one, in [0, 1]")
    d.add_argument("--repetition-penalty", type=float, default=None, help="1 = off, > 1 discourages repeats")
    d.add_argument("--penalty-last-n", type=int, default=64,
                   help="recent tokens the penalties look at (every request)")
    s.add_argument("--max-body-mib", type=float, default=8.0, help="larger request bodies are refused (413)")
    s.add_argument("--chunk-size", type=int, default=256, help="prompt tokens per forward pass")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    r = s.add_argument_group(
        "replicas", "several engine replicas on Ray Serve behind one endpoint, each with its own model; a "
        "session's requests go to the replica holding it (the 'replicas' extra: pip install 'streamingllm[replicas]')."
        " Give them a shared --session-store redis://... so that a session outlives its replica. See docs/serving.md")
    r.add_argument("--replicas", type=int, default=0,
                   help="engine replicas on Ray Serve (0: this one process, no Ray)")
    r.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. 'auto' or ray://head:10001; default: start a local one)")
    r.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves for each replica; also its torch threads")
    add_model_options(s, compile=True)
    add_cache_options(s)
    add_conversation_memory_options(s)
    s.set_defaults(run=run)


def allowed_hosts(names: str | None, host: str) -> tuple[str, ...]:
    """``--allowed-hosts`` as a tuple; by default the bind address ``host`` and the loopback names."""
    from ..serve.server import LOOPBACK_NAMES

    if names is None:
        return tuple(dict.fromkeys((host.strip("[]").lower(), *LOOPBACK_NAMES)))
    return tuple(n.strip().lower() for n in names.split(","))


def settings_from_args(args):
    """The :class:`~streamingllm.serve.server.ServerSettings` of ``streamingllm serve``'s options, checked."""
    from ..serve.server import ServerSettings

    return ServerSettings(
        sink_size=args.sink_size, window_size=args.window_size, chunk_size=args.chunk_size, max_batch=args.max_batch,
        max_queue=args.max_queue, max_sessions=args.max_sessions, max_cache_mib=args.max_cache_mib,
        state_dir=args.state_dir, session_store=args.session_store, lease_ttl=args.lease_ttl,
        session_ttl=args.session_ttl, max_sessions_known=args.max_sessions_known,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, penalty_last_n=args.penalty_last_n,
        max_body_mib=args.max_body_mib, api_key=args.api_key,
        allowed_hosts=allowed_hosts(args.allowed_hosts, args.host), compile=args.compile,
        memory=memory_from_args(args, only_if_asked=True), evict=args.evict).check()


def run(args) -> int:
    from ..checks import check_int
    from ..extras import require
    from ..serve.backends import connect, is_redis_url
    from ..serve.server import build_app

    settings = settings_from_args(args)
    check_int("port", args.port, 0, 65535)
    check_replicas(args, settings)
    if is_redis_url(settings.session_store):  # fail before the model loads: no redis-py, or Redis not answering
        connect(settings.session_store).close()
    if args.replicas:
        return run_replicas(args, settings)
    uvicorn = require("uvicorn", "the server")
    from .options import check_trained_length, load_model

    check_trained_length(args)
    model, tokenizer = load_model(args, chat=True)  # a model without a chat template is refused before its weights
    check_trained_length(args, model)
    name = args.served_model_name or args.model
    app, engine = build_app(model, tokenizer, name, settings)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"streamingllm: warning: serving on {args.host} without --api-key", file=sys.stderr)
    if args.host in ("0.0.0.0", "::") and args.allowed_hosts is None:
        print(f"streamingllm: warning: only requests naming {', '.join(settings.allowed_hosts)} in their Host header "
              "are served; give the names clients use with --allowed-hosts", file=sys.stderr)
    print(f"streamingllm serve: {name} on http://{args.host}:{args.port}/ (chat page), OpenAI API at /v1, "
          f"cache {settings.sink_size}+{settings.window_size} tokens per session", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0


def check_replicas(args, settings) -> None:
    """Refuse replica options that cannot work, naming them: a negative count, no CPUs, and more
    than one replica on a state directory (it belongs to one process; share a Redis store)."""
    from ..checks import ArgumentError, check_int
    from ..serve.backends import is_redis_url

    check_int("replicas", args.replicas, 0)
    if not args.replica_cpus > 0:
        raise ArgumentError("replica_cpus", "must be a number > 0", args.replica_cpus)
    where = settings.session_store or settings.state_dir
    if args.replicas > 1 and where is not None and not is_redis_url(where):
        raise ArgumentError("session_store", f"must be a redis:// URL that every replica shares when replicas is "
                            f"more than 1 (here {args.replicas}): a state_dir belongs to one process", where,
                            mentions=("replicas", "state_dir"))


def run_replicas(args, settings) -> int:
    """``--replicas N``: the server as replicas on Ray Serve (:mod:`streamingllm.serve.replicas`)."""
    from ..extras import require
    from .options import check_trained_length

    require("ray", "--replicas")
    check_trained_length(args)
    from ..serve import replicas

    cli_args = {k: v for k, v in vars(args).items() if k != "run"}
    print(f"streamingllm serve: starting {args.replicas} replicas of {args.served_model_name or args.model} on Ray "
          f"({args.ray_address or 'a local cluster'})", file=sys.stderr, flush=True)
    return replicas.run(cli_args, settings, host=args.host, port=args.port, replicas=args.replicas,
                        replica_cpus=args.replica_cpus, ray_address=args.ray_address)
