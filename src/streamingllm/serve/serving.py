"""Serving the OpenAI API: a request becomes an engine :class:`~.jobs.Job`, and the job's events
become OpenAI's responses (:mod:`.protocol`), whole or as server-sent events.

:class:`OpenAIServing` is what the routes in :mod:`.app` call; it raises :class:`APIError`, which
the application turns into OpenAI's error object with its status. A streamed response that
fails after it began carries the error object as its last event, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from .. import __version__
from .engine import Engine, OverloadedError, emitter
from .jobs import Event, Failed, Finished, Job, TokenLogprob, TokenText
from .protocol import (AssistantMessage, ChatCompletionChunk, ChatCompletionLogProb, ChatCompletionLogProbs,
                       ChatCompletionLogProbsContent, ChatCompletionRequest, ChatCompletionResponse,
                       ChatCompletionResponseChoice, ChatCompletionResponseStreamChoice, CompletionChunk,
                       CompletionLogProbs, CompletionRequest, CompletionResponse, CompletionResponseChoice,
                       DeltaMessage, FinishReason, GenerationParams, ModelCard, ModelList, RequestDefaults,
                       UsageInfo, error_body, new_id, now)
from .backends import StoreError
from .sessions import SessionBusyError, SessionLimitError, SessionStore, UnknownSessionError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 413: "request_too_large", 500: "server_error", 503: "overloaded_error"}
DISCONNECT_CHECK_S = 0.5  # how often a whole (non-streamed) request checks that its client is still there
MAX_SESSION_ID = 64  # characters; the server's ids have 29
STORE_RETRY_S = 2  # seconds a client is told to wait when the session store failed a turn (503)


class APIError(Exception):
    """An error answered as OpenAI's error object: HTTP ``status``, ``message``, the request
    parameter at fault (``param``), extra response ``headers``, and OpenAI's error ``type_``
    (default: the one for ``status`` in ERROR_TYPES)."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers
        self.type = type_ or ERROR_TYPES.get(status, "server_error")

    @classmethod
    def of(cls, failure: Failed) -> APIError:
        """The error of a failed job (a 503, the session store's, says when to retry)."""
        headers = {"Retry-After": str(STORE_RETRY_S)} if failure.status == 503 else None
        return cls(failure.status, failure.message, failure.param, headers, failure.error_type)

    @classmethod
    def of_store(cls, err: StoreError) -> APIError:
        """503 with Retry-After: the session store is unreachable, or another process holds the session."""
        return cls(503, str(err), "session_id", {"Retry-After": str(max(1, math.ceil(err.retry_after)))})


class ClientGone(Exception):
    """The client disconnected while its request waited."""


class OpenAIServing:
    """The API over one engine and its session store.

    Args:
        engine: the started :class:`~.engine.Engine`.
        store: its sessions.
        model_name: the name the model is served as (requests must give it).
        retry_after: seconds a client is told to wait when the server is overloaded (503).
        defaults: what requests get for what they leave unset, and their ``max_tokens`` limit
            (None: :data:`~.protocol.LOCAL_SAMPLING` with the engine's ``penalty_last_n`` and
            ``max_tokens``, and the default limit).
    """

    def __init__(self, engine: Engine, store: SessionStore, model_name: str, retry_after: int = 2,
                 defaults: RequestDefaults | None = None):
        self.engine, self.store, self.model_name, self.retry_after = engine, store, model_name, retry_after
        if defaults is None:
            base = RequestDefaults()
            defaults = RequestDefaults(replace(base.sampling, penalty_last_n=engine.penalty_last_n), engine.max_tokens,
                                       max(engine.max_tokens, base.max_tokens_limit))
        self.defaults = defaults

    # --- models, health, sessions -------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", type_="not_found_error")

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name)])

    def model_card(self, name: str) -> ModelCard:
        """The served model's card, when ``name`` is its name (404 otherwise)."""
        self.check_model(name)
        return ModelCard(id=self.model_name)

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, **self.engine.load, "sink_size": self.engine.sink_size,
                "window_size": self.engine.window_size, "defaults": self.defaults.describe()}

    def create_session(self, pin_system: bool, sid: str | None = None) -> dict:
        """A new session (``pin_system``: it keeps its system prompt as attention sinks), described.
        ``sid``: its id, when the server's ingress chose it (:mod:`.replicas`)."""
        try:
            return self.store.describe(self.store.create(pin_system=pin_system, sid=sid))
        except SessionLimitError as err:
            raise APIError(429, f"{err} (--max-sessions-known); delete one (DELETE /v1/sessions/{{id}}) or wait "
                                "for idle ones to expire (--session-ttl)", type_="rate_limit_error") from None
        except StoreError as err:
            raise APIError.of_store(err) from None

    def describe_session(self, sid: str) -> dict:
        check_session_id(sid)
        try:
            return self.store.describe(sid)
        except UnknownSessionError:
            raise APIError(404, f"no session {sid!r}", "session_id") from None
        except StoreError as err:
            raise APIError.of_store(err) from None

    def delete_session(self, sid: str) -> dict:
        check_session_id(sid)
        try:
            self.store.delete(sid)
        except UnknownSessionError:
            raise APIError(404, f"no session {sid!r}", "session_id") from None
        except SessionBusyError:
            raise APIError(409, f"session {sid!r} is serving a request", "session_id") from None
        except StoreError as err:
            raise APIError.of_store(err) from None
        return {"id": sid, "object": "session", "deleted": True}

    # --- completions --------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        """``POST /v1/chat/completions``, in a session when the request names one."""
        return await self._serve(request, body, ChatReply)

    async def completion(self, body: CompletionRequest, request: Request) -> Response:
        """``POST /v1/completions`` (one-off: text completions have no session)."""
        if body.session_id is not None or "x-session-id" in request.headers:
            raise APIError(400, "sessions are for /v1/chat/completions; text completions are one-off", "session_id")
        return await self._serve(request, body, CompletionReply)

    async def _serve(self, request: Request, body: ChatCompletionRequest | CompletionRequest,
                     reply_class: type[_Reply]) -> Response:
        """Run one request through the engine and answer it (streamed or whole)."""
        self.check_model(body.model)
        sid = body.session_id if body.session_id is not None else request.headers.get("x-session-id")
        entry = None if sid is None else self._claim(check_session_id(sid))
        events = JobEvents(request)
        submitted = False
        try:
            generation = body.to_generation(self.defaults)
            job = Job(generation, events.emit, entry, cancelled=events.cancelled)
            self.engine.submit(job)
            submitted = True
        except OverloadedError:
            raise APIError(503, "the server is at capacity; retry later",
                           headers={"Retry-After": str(self.retry_after)}) from None
        except ValueError as err:  # a limit or a sampling setting the library refuses
            raise APIError(400, str(err), getattr(err, "param", None)) from None
        finally:
            if entry is not None and not submitted:  # the engine releases the sessions of the jobs it has
                self.store.release(entry)
        reply = reply_class(body.model, generation.top_logprobs is not None)
        try:
            return await self._answer(events, reply, body)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except asyncio.CancelledError:
            events.cancelled.set()
            raise

    def _claim(self, sid: str):
        try:
            return self.store.claim(sid)
        except UnknownSessionError:
            raise APIError(404, f"no session {sid!r}; create one with POST /v1/sessions", "session_id") from None
        except SessionBusyError:
            raise APIError(409, f"session {sid!r} is serving another request; wait for it", "session_id") from None
        except StoreError as err:
            raise APIError.of_store(err) from None

    async def _answer(self, events: JobEvents, reply: _Reply, body: GenerationParams) -> Response:
        event = await events.next()
        if isinstance(event, Failed):
            raise APIError.of(event)
        if body.stream:
            return StreamingResponse(_stream(events, event, reply, body.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        while True:
            if isinstance(event, Failed):
                raise APIError.of(event)
            if isinstance(event, Finished):
                return JSONResponse(reply.whole(event).model_dump())
            reply.add(event)
            event = await events.next()


def check_session_id(sid: str) -> str:
    """``sid`` when it can be a session id (1 to MAX_SESSION_ID characters); else 400 naming
    ``session_id`` (an empty id is not "no session", and a long one is not echoed back)."""
    if not 0 < len(sid) <= MAX_SESSION_ID:
        raise APIError(400, f"session_id must be 1 to {MAX_SESSION_ID} characters, got {len(sid)}", "session_id")
    return sid


class JobEvents:
    """One job's events, handed from the worker thread to the event loop, and the flag that
    cancels the job. :meth:`next` also watches the client: when it has gone, the job is cancelled
    (ClientGone), checked at least every DISCONNECT_CHECK_S however fast the events come."""

    def __init__(self, request: Request):
        self.request = request
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.emit = emitter(asyncio.get_running_loop(), self.queue)
        self.cancelled = threading.Event()
        self._watched_at = 0.0  # when the client was last checked (the loop's clock, seconds)

    async def next(self) -> Event:
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() - self._watched_at >= DISCONNECT_CHECK_S:
                self._watched_at = loop.time()
                if await self.request.is_disconnected():
                    self.cancelled.set()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                continue


async def _stream(events: JobEvents, first: Event, reply: _Reply, include_usage: bool):
    """Server-sent events, OpenAI's chunks; the job is cancelled if the client goes away (the
    response is then closed, and ``finally`` runs)."""
    try:
        for chunk in reply.opening():
            yield _sse(chunk)
        event = first
        while True:
            if isinstance(event, Failed):  # after the response began: an error object in the stream
                yield _sse(error_body(event.message, event.error_type or "server_error", event.status))
                break
            if isinstance(event, Finished):
                yield _sse(reply.finishing(event))
                if include_usage:
                    yield _sse(reply.usage_chunk(event))
                break
            chunk = reply.chunk(event)
            if chunk is not None:
                yield _sse(chunk)
            event = await events.queue.get()
        yield "data: [DONE]\n\n"
    finally:
        events.cancelled.set()  # a no-op once the job has ended; stops it when the client disconnected


def _sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump() if isinstance(obj, BaseModel) else obj
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def finish_reason(done: Finished) -> FinishReason:
    """OpenAI's finish reasons: a cancelled reply ended like one cut by length."""
    return "stop" if done.reason == "stop" else "length"


def usage(done: Finished) -> UsageInfo:
    return UsageInfo.of(done.prompt_tokens, done.completion_tokens, done.cached_tokens)


class _Reply(ABC):
    """One response being built from a job's events: whole (:meth:`add` each token, then
    :meth:`whole`) or streamed (:meth:`opening`, :meth:`chunk` per token, :meth:`finishing`)."""

    id_prefix: ClassVar[str]

    def __init__(self, model: str, logprobs: bool):
        self.model, self.logprobs = model, logprobs
        self.id, self.created = new_id(self.id_prefix), now()
        self.text: list[str] = []
        self.chars = 0  # len("".join(self.text)), kept as tokens come
        self.lps: list[TokenLogprob] = []

    def head(self) -> dict:
        """The fields every response and chunk starts with."""
        return {"id": self.id, "created": self.created, "model": self.model,
                "system_fingerprint": f"streamingllm-{__version__}"}

    def add(self, event: TokenText) -> int:
        """Take a token's text; returns the character where it starts in the reply."""
        at = self.chars
        self.text.append(event.text)
        self.chars += len(event.text)
        if event.logprob is not None:
            self.lps.append(event.logprob)
        return at

    def opening(self) -> list[BaseModel]:
        """The chunks a stream starts with, before any token."""
        return []

    def chunk(self, event: TokenText) -> BaseModel | None:
        """The chunk for a token (None when it shows nothing: no text, no log-probabilities)."""
        at = self.add(event)
        if not event.text and event.logprob is None:
            return None
        return self._chunk(event.text, None if event.logprob is None else self._logprobs([event.logprob], at))

    @abstractmethod
    def finishing(self, done: Finished) -> BaseModel:
        """The chunk that ends the reply (its finish reason, and the session's numbers)."""

    @abstractmethod
    def usage_chunk(self, done: Finished) -> BaseModel:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""

    @abstractmethod
    def whole(self, done: Finished) -> BaseModel:
        """The whole response, once every token was :meth:`add`-ed."""

    @abstractmethod
    def _chunk(self, text: str, logprobs) -> BaseModel:
        """A chunk carrying a token's ``text`` and its ``logprobs`` object (or None)."""

    @abstractmethod
    def _logprobs(self, entries: list[TokenLogprob], at: int = 0):
        """OpenAI's logprobs object for ``entries``, the first of which starts at character ``at``
        (None when the request did not ask for them)."""


class ChatReply(_Reply):
    """A chat completion (``chat.completion``, chunks ``chat.completion.chunk``)."""

    id_prefix = "chatcmpl"

    def opening(self) -> list[BaseModel]:
        return [self._chunk_of(DeltaMessage(role="assistant", content=""))]

    def _chunk(self, text: str, logprobs) -> ChatCompletionChunk:
        return self._chunk_of(DeltaMessage(content=text), logprobs)

    def _chunk_of(self, delta: DeltaMessage, logprobs=None, done: Finished | None = None) -> ChatCompletionChunk:
        choice = ChatCompletionResponseStreamChoice(delta=delta, logprobs=logprobs,
                                                    finish_reason=None if done is None else finish_reason(done))
        return ChatCompletionChunk(**self.head(), choices=[choice], session=None if done is None else done.session)

    def finishing(self, done: Finished) -> ChatCompletionChunk:
        return self._chunk_of(DeltaMessage(), done=done)

    def usage_chunk(self, done: Finished) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head(), choices=[], usage=usage(done))

    def whole(self, done: Finished) -> ChatCompletionResponse:
        choice = ChatCompletionResponseChoice(message=AssistantMessage(content="".join(self.text)),
                                              logprobs=self._logprobs(self.lps), finish_reason=finish_reason(done))
        return ChatCompletionResponse(**self.head(), choices=[choice], usage=usage(done), session=done.session)

    def _logprobs(self, entries: list[TokenLogprob], at: int = 0) -> ChatCompletionLogProbs | None:
        if not self.logprobs:
            return None
        return ChatCompletionLogProbs(content=[ChatCompletionLogProbsContent(
            token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
            top_logprobs=[ChatCompletionLogProb(token=t, logprob=v, bytes=list(t.encode())) for t, v in e.top])
            for e in entries])


class CompletionReply(_Reply):
    """A text completion (``text_completion``, its chunks too)."""

    id_prefix = "cmpl"

    def _chunk(self, text: str, logprobs, done: Finished | None = None) -> CompletionChunk:
        choice = CompletionResponseChoice(text=text, logprobs=logprobs,
                                          finish_reason=None if done is None else finish_reason(done))
        return CompletionChunk(**self.head(), choices=[choice], session=None if done is None else done.session)

    def finishing(self, done: Finished) -> CompletionChunk:
        return self._chunk("", None, done)

    def usage_chunk(self, done: Finished) -> CompletionChunk:
        return CompletionChunk(**self.head(), choices=[], usage=usage(done))

    def whole(self, done: Finished) -> CompletionResponse:
        choice = CompletionResponseChoice(text="".join(self.text), logprobs=self._logprobs(self.lps),
                                          finish_reason=finish_reason(done))
        return CompletionResponse(**self.head(), choices=[choice], usage=usage(done), session=done.session)

    def _logprobs(self, entries: list[TokenLogprob], at: int = 0) -> CompletionLogProbs | None:
        if not self.logprobs:
            return None
        offsets = []
        for e in entries:
            offsets.append(at)
            at += len(e.token)
        return CompletionLogProbs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                                  top_logprobs=[dict(e.top) for e in entries], text_offset=offsets)
