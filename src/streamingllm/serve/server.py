"""Build and run a server: the model, the session store, the engine and the application."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import ArgumentError, check_choice, check_int
from ..compiled import COMPILE


@dataclass(frozen=True)
class ServerSettings:
    """What ``streamingllm serve`` takes (each checked by :meth:`check`).

    Attributes:
        sink_size, window_size: each session's cache (tokens).
        chunk_size: prompt tokens per forward (>= 1).
        max_batch: requests generating at once, in one batched forward per step (>= 1).
        max_queue: requests waiting beyond those before 503 (>= 0).
        max_sessions: sessions held in memory (>= 1); least recently used ones are evicted.
        max_cache_mib: MiB of cache held in memory, all sessions together (None: no limit).
        state_dir: directory where sessions are saved after every turn and found after a restart.
        max_prompt_tokens: tokens one request may feed (413 beyond).
        max_tokens: reply limit when a request gives none (tokens).
        max_body_mib: request bodies larger than this are refused (413; MiB).
        api_key: required as ``Authorization: Bearer <key>`` on /v1/* when set.
        penalty_last_n: tokens the repetition penalties look at.
        compile: a lone request's decode steps compiled: ``"auto"`` (on CUDA), ``"on"``, ``"off"``
            (:mod:`streamingllm.compiled`).
    """

    sink_size: int = 4
    window_size: int = 1020
    chunk_size: int = 256
    max_batch: int = 8
    max_queue: int = 64
    max_sessions: int = 64
    max_cache_mib: float | None = None
    state_dir: str | None = None
    max_prompt_tokens: int = 65536
    max_tokens: int = 512
    max_body_mib: float = 8.0
    api_key: str | None = None
    penalty_last_n: int = 64
    compile: str = "auto"

    def check(self) -> ServerSettings:
        from ..cache import check_cache_sizes

        check_cache_sizes(self.sink_size, self.window_size)
        check_choice("compile", self.compile, list(COMPILE))
        for name, low in (("chunk_size", 1), ("max_batch", 1), ("max_queue", 0), ("max_sessions", 1),
                          ("max_prompt_tokens", 1), ("max_tokens", 1), ("penalty_last_n", 0)):
            check_int(name, getattr(self, name), low)
        for name in ("max_cache_mib", "max_body_mib"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ArgumentError(name, "must be a number > 0", value)
        return self


def build_app(model, tokenizer, model_name: str, settings: ServerSettings):
    """``(app, engine)``: the FastAPI application over a started engine (stop it with ``engine.stop()``)."""
    from ..extras import require

    require("fastapi", "the server")
    require("prometheus_client", "the server's metrics")
    from .app import create_app
    from .engine import Engine
    from .sessions import SessionStore

    s = settings.check()
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_name} has no chat template: the server needs a chat (instruct) model")
    engine_ref = {}
    store = SessionStore(lambda system, pin: engine_ref["engine"].new_session(system, pin), s.max_sessions,
                         None if s.max_cache_mib is None else int(s.max_cache_mib * 2**20), s.state_dir)
    engine = Engine(model, tokenizer, s.sink_size, s.window_size, store, chunk_size=s.chunk_size,
                    max_batch=s.max_batch, max_queue=s.max_queue, max_prompt_tokens=s.max_prompt_tokens,
                    max_tokens=s.max_tokens, penalty_last_n=s.penalty_last_n, compile=s.compile)
    engine_ref["engine"] = engine
    app = create_app(engine, store, model_name, api_key=s.api_key, max_body_bytes=int(s.max_body_mib * 2**20))
    engine.start()
    return app, engine
