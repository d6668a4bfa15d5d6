"""``streamingllm serve``: an OpenAI-compatible server with one sink cache per conversation."""

from __future__ import annotations

import os
import sys

from .options import add_cache_options, add_compile_option, add_model_options, add_parser

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
    s.add_argument("--state-dir", default=None,
                   help="save every session here after each turn; evicted and restarted sessions come back exactly")
    s.add_argument("--max-sessions", type=int, default=64, help="sessions held in memory (LRU eviction beyond)")
    s.add_argument("--max-cache-mib", type=float, default=None, help="MiB of cache in memory, all sessions together")
    s.add_argument("--max-batch", type=int, default=8, help="requests generating at once, batched per step")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond --max-batch before 503")
    s.add_argument("--max-prompt-tokens", type=int, default=65536, help="tokens one request may add (413 beyond)")
    s.add_argument("--max-tokens", type=int, default=512, help="reply limit when a request gives none")
    s.add_argument("--max-body-mib", type=float, default=8.0, help="larger request bodies are refused (413)")
    s.add_argument("--chunk-size", type=int, default=256, help="prompt tokens per forward pass")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    add_model_options(s)
    add_compile_option(s)
    add_cache_options(s)
    s.set_defaults(run=run)


def run(args) -> int:
    from ..checks import check_int
    from ..extras import require
    from ..serve.server import ServerSettings, build_app

    settings = ServerSettings(sink_size=args.sink_size, window_size=args.window_size, chunk_size=args.chunk_size,
                              max_batch=args.max_batch, max_queue=args.max_queue, max_sessions=args.max_sessions,
                              max_cache_mib=args.max_cache_mib, state_dir=args.state_dir,
                              max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                              max_body_mib=args.max_body_mib, api_key=args.api_key, compile=args.compile).check()
    check_int("port", args.port, 0, 65535)
    uvicorn = require("uvicorn", "the server")
    from .options import check_chat_model, load_model

    model, tokenizer = load_model(args)
    check_chat_model(tokenizer, args.model)
    name = args.served_model_name or args.model
    app, engine = build_app(model, tokenizer, name, settings)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"streamingllm: warning: serving on {args.host} without --api-key", file=sys.stderr)
    print(f"streamingllm serve: {name} on http://{args.host}:{args.port}/ (chat page), OpenAI API at /v1, "
          f"cache {settings.sink_size}+{settings.window_size} tokens per session", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0
