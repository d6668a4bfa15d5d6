"""Build and run a server: the model, the session store, the engine and the application."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..cache.blocks import BlockMemory
from ..checks import ArgumentError, check_choice, check_float, check_int
from ..compiled import COMPILE
from ..sampling import SAMPLING_KEYS, Sampling, model_sampling
from ..session import EVICTION

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # the names a server bound to loopback answers to


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
        state_dir: directory where sessions are saved after every turn and found after a restart
            (the same as a directory ``session_store``; give one of the two).
        session_store: where sessions are saved after every turn: a ``redis://`` or ``rediss://``
            URL (shared by several processes, each session under a lease) or a directory.
        lease_ttl: seconds a process's lease on a session of a Redis store lasts unless renewed (> 0):
            how long the sessions of a process that died stay unavailable to the others.
        owner: this process's id in the leases (None: ``host:pid:random``).
        session_ttl: seconds a session may stay idle before it expires, in memory and in the store (0: never).
        max_sessions_known: sessions that may exist at once, in memory or saved (>= 1; 429 beyond).
        max_prompt_tokens: tokens one request may feed (413 beyond).
        max_tokens: reply limit when a request gives none (tokens).
        max_tokens_limit: the most tokens a request may ask for as ``max_tokens``,
            ``max_completion_tokens`` or ``min_tokens`` (400 beyond; >= ``max_tokens``).
        temperature, top_k, top_p, min_p, repetition_penalty: the sampling of the requests that
            leave it unset; None: the model's ``generation_config``'s when it recommends one, else
            :data:`~.protocol.LOCAL_SAMPLING`'s (:meth:`request_defaults`).
        max_body_mib: request bodies larger than this are refused (413; MiB).
        api_key: required as ``Authorization: Bearer <key>`` on /v1/* when set.
        allowed_hosts: the names a request's ``Host`` header may give (``*``: any; ``*.example.org``:
            its subdomains); others get 400, so DNS rebinding cannot reach the server. None: any.
        penalty_last_n: tokens the repetition penalties look at.
        compile: a lone request's decode steps compiled: ``"auto"`` (on CUDA), ``"on"``, ``"off"``
            (:mod:`streamingllm.compiled`).
        memory: each session keeps what leaves its window in a memory of blocks
            (:class:`~streamingllm.cache.BlockMemory`); None: StreamingLLM's cache.
        evict: ``"tokens"`` or ``"turns"``: sessions evict whole exchanges (:class:`~streamingllm.session.Session`).
    """

    sink_size: int = 4
    window_size: int = 1020
    chunk_size: int = 256
    max_batch: int = 8
    max_queue: int = 64
    max_sessions: int = 64
    max_cache_mib: float | None = None
    state_dir: str | None = None
    session_store: str | None = None
    lease_ttl: float = 10.0
    owner: str | None = None
    session_ttl: float = 86400.0
    max_sessions_known: int = 1024
    max_prompt_tokens: int = 65536
    max_tokens: int = 512
    max_tokens_limit: int = 4096
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_body_mib: float = 8.0
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES
    penalty_last_n: int = 64
    compile: str = "auto"
    memory: BlockMemory | None = None
    evict: str = "tokens"

    def check(self) -> ServerSettings:
        from ..cache import check_cache_sizes

        check_cache_sizes(self.sink_size, self.window_size)
        check_choice("compile", self.compile, list(COMPILE))
        check_choice("evict", self.evict, list(EVICTION))
        if self.memory is not None and not isinstance(self.memory, BlockMemory):
            raise ArgumentError("memory", "must be a streamingllm.BlockMemory or None", self.memory)
        for name, low in (("chunk_size", 1), ("max_batch", 1), ("max_queue", 0), ("max_sessions", 1),
                          ("max_sessions_known", 1), ("max_prompt_tokens", 1), ("max_tokens", 1), ("penalty_last_n", 0)):
            check_int(name, getattr(self, name), low)
        if self.allowed_hosts is not None and not (self.allowed_hosts and all(self.allowed_hosts)):
            raise ArgumentError("allowed_hosts", "must name at least one host (or '*' for any), none empty",
                                self.allowed_hosts)
        for name in ("max_cache_mib", "max_body_mib"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ArgumentError(name, "must be a number > 0", value)
        check_float("session_ttl", self.session_ttl, 0)
        check_float("lease_ttl", self.lease_ttl, 0, open_min=True)
        if self.state_dir is not None and self.session_store is not None:
            raise ArgumentError("session_store", "cannot be given with state_dir (a directory store is the state "
                                "dir): give one of them", self.session_store, mentions=("state_dir",))
        for name in ("state_dir", "session_store", "owner"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ArgumentError(name, "must be a non-empty string", value)
        check_int("max_tokens_limit", self.max_tokens_limit, 1)
        if self.max_tokens > self.max_tokens_limit:
            raise ArgumentError("max_tokens", "must be <= max_tokens_limit", self.max_tokens,
                                mentions=("max_tokens_limit",))
        Sampling(**self._sampling_given())  # checks each one set
        return self

    def _sampling_given(self) -> dict:
        return {name: getattr(self, name) for name in SAMPLING_KEYS if getattr(self, name) is not None}

    def request_defaults(self, generation_config=None):
        """The :class:`~.protocol.RequestDefaults`: each sampling setting given here, else the
        model's recommendation (``generation_config``, :func:`~streamingllm.sampling.model_sampling`)
        when it has one, else :data:`~.protocol.LOCAL_SAMPLING`'s; ``max_tokens`` and its limit."""
        from .protocol import LOCAL_SAMPLING, RequestDefaults

        base = model_sampling(generation_config, self.penalty_last_n) or replace(
            LOCAL_SAMPLING, penalty_last_n=self.penalty_last_n)
        return RequestDefaults(replace(base, **self._sampling_given()), self.max_tokens, self.max_tokens_limit)


def build_app(model, tokenizer, model_name: str, settings: ServerSettings):
    """``(app, engine)``: the FastAPI application over a started engine (stop it with ``engine.stop()``,
    which closes the session store too: its leases are handed back at once)."""
    from ..extras import require

    require("fastapi", "the server")
    require("prometheus_client", "the server's metrics")
    from .app import create_app
    from .backends import open_backend
    from .engine import Engine
    from .logs import install_redaction
    from .sessions import SessionStore

    s = settings.check()
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_name} has no chat template: the server needs a chat (instruct) model")
    engine_ref = {}
    install_redaction()  # before the state dir is read: what that logs names files by session id
    where = s.session_store or s.state_dir
    backend = None if where is None else open_backend(where, owner=s.owner, session_ttl=s.session_ttl,
                                                       lease_ttl=s.lease_ttl)
    store = SessionStore(lambda system, pin: engine_ref["engine"].new_session(system, pin), s.max_sessions,
                         None if s.max_cache_mib is None else int(s.max_cache_mib * 2**20), ttl=s.session_ttl,
                         max_known=s.max_sessions_known, backend=backend)
    engine = Engine(model, tokenizer, s.sink_size, s.window_size, store, chunk_size=s.chunk_size,
                    max_batch=s.max_batch, max_queue=s.max_queue, max_prompt_tokens=s.max_prompt_tokens,
                    max_tokens=s.max_tokens, penalty_last_n=s.penalty_last_n, compile=s.compile, memory=s.memory,
                    evict=s.evict)
    engine_ref["engine"] = engine
    app = create_app(engine, store, model_name, api_key=s.api_key, max_body_bytes=int(s.max_body_mib * 2**20),
                     allowed_hosts=s.allowed_hosts,
                     defaults=s.request_defaults(getattr(model, "generation_config", None)))
    engine.start()
    return app, engine
