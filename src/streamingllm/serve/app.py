"""The FastAPI application: OpenAI-compatible routes over the engine, the chat page, metrics.

Routes take the engine from ``app.state``, turn a request into a :class:`~.engine.Job`, and send
its events back as one JSON body or as server-sent events in OpenAI's chunk format (ending with
``data: [DONE]``). Every error is OpenAI's JSON error object with a fitting status code.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .engine import Engine, Job, OverloadedError, emitter
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, SessionRequest, error_body, new_id, now
from .sessions import SessionBusyError, SessionStore, UnknownSessionError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 413: "request_too_large", 500: "server_error", 503: "overloaded_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers
        self.type = type_ or ERROR_TYPES.get(status, "server_error")


class ClientGone(Exception):
    """The client disconnected while its request waited."""


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_ or ERROR_TYPES.get(status, "invalid_request_error"), None, param),
                        status_code=status, headers=headers)


def create_app(engine: Engine, store: SessionStore, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = 8 << 20, retry_after: int = 2) -> FastAPI:
    """The application serving ``engine`` (already started) as ``model_name``.

    Args:
        api_key: when given, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        max_body_bytes: request bodies larger than this are refused (413).
        retry_after: seconds a client is told to wait when the server is overloaded (503).
    """
    app = FastAPI(title="streamingllm", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.engine, app.state.store, app.state.model_name = engine, store, model_name
    app.state.retry_after = retry_after
    app.state.metrics = metrics = Metrics(lambda: {**store.counts(), **engine.load})
    engine.metrics = metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            metrics.error(413)
            return error_response(413, f"the request body has {size} bytes; this server takes at most {max_body_bytes}")
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                metrics.error(401)
                return error_response(401, "a valid API key is required: Authorization: Bearer <key>")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        metrics.error(400)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                            for e in exc.errors()[:5])
        return error_response(400, f"invalid request: {details}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        metrics.error(500)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.error(exc.status)
        return error_response(exc.status, str(exc), exc.type, exc.param, exc.headers)

    app.include_router(_router())
    return app


def _router() -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text())

    @router.get("/health")
    async def health(request: Request):
        engine = request.app.state.engine
        return {"status": "ok", "model": request.app.state.model_name, **engine.load,
                "sink_size": engine.sink_size, "window_size": engine.window_size}

    @router.get("/metrics", include_in_schema=False)
    async def metrics(request: Request):
        return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    @router.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [_model_card(request)]}

    @router.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        _check_model(request, model_id)
        return _model_card(request)

    @router.post("/v1/sessions")
    async def create_session(request: Request, body: SessionRequest | None = None):
        sid = request.app.state.store.create(pin_system=bool(body and body.pin_system))
        return request.app.state.store.describe(sid)

    @router.get("/v1/sessions/{sid}")
    async def get_session(request: Request, sid: str):
        try:
            return request.app.state.store.describe(sid)
        except UnknownSessionError:
            raise APIError(404, f"no session {sid!r}", "session_id") from None

    @router.delete("/v1/sessions/{sid}")
    async def delete_session(request: Request, sid: str):
        try:
            request.app.state.store.delete(sid)
        except UnknownSessionError:
            raise APIError(404, f"no session {sid!r}", "session_id") from None
        except SessionBusyError:
            raise APIError(409, f"session {sid!r} is serving a request", "session_id") from None
        return {"id": sid, "object": "session", "deleted": True}

    @router.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest):
        top = (body.top_logprobs or 0) if body.logprobs else None
        messages = [m.as_dict() for m in body.messages]
        return await _serve(request, body, "chat.completion", top, messages=messages)

    @router.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        if body.session_id is not None or "x-session-id" in request.headers:
            raise APIError(400, "sessions are for /v1/chat/completions; text completions are one-off", "session_id")
        return await _serve(request, body, "text_completion", body.logprobs, prompt=body.prompt)

    return router


def _model_card(request: Request) -> dict:
    return {"id": request.app.state.model_name, "object": "model", "created": 0, "owned_by": "streamingllm"}


def _check_model(request: Request, name: str) -> None:
    if name != request.app.state.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {request.app.state.model_name!r}",
                       "model", type_="not_found_error")


async def _serve(request: Request, body, kind: str, top_logprobs: int | None, messages=None, prompt=None):
    """Run one request through the engine and answer it (streamed or whole)."""
    app = request.app
    _check_model(request, body.model)
    sid = body.session_id or request.headers.get("x-session-id")
    engine, store = app.state.engine, app.state.store
    entry = None
    if sid is not None:
        try:
            entry = store.claim(sid)
        except UnknownSessionError:
            raise APIError(404, f"no session {sid!r}; create one with POST /v1/sessions", "session_id") from None
        except SessionBusyError:
            raise APIError(409, f"session {sid!r} is serving another request; wait for it", "session_id") from None
    events: asyncio.Queue = asyncio.Queue()
    submitted = False
    try:
        job = Job(messages=messages, prompt=prompt, entry=entry, sampling=body.sampling(engine.penalty_last_n),
                  max_tokens=body.reply_limit or engine.max_tokens, min_tokens=body.min_tokens, stop=tuple(body.stop),
                  top_logprobs=top_logprobs, emit=emitter(asyncio.get_running_loop(), events))
        engine.submit(job)
        submitted = True
    except OverloadedError:
        raise APIError(503, "the server is at capacity; retry later",
                       headers={"Retry-After": str(app.state.retry_after)}) from None
    except ValueError as err:  # a sampling setting the library refuses
        raise APIError(400, str(err)) from None
    finally:
        if entry is not None and not submitted:  # the engine releases the sessions of the jobs it has
            store.release(entry)
    reply = _Reply(kind, body.model, top_logprobs is not None)
    try:
        return await _answer(request, body, job, events, reply)
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    except asyncio.CancelledError:
        job.cancelled.set()
        raise


async def _answer(request: Request, body, job: Job, events: asyncio.Queue, reply: _Reply):
    first = await _next(request, job, events)
    if first["type"] == "error":
        raise APIError(first["status"], first["message"], first.get("param"), type_=first.get("error_type"))
    if body.stream:
        return StreamingResponse(_stream(request, job, events, first, reply, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    event = first
    while True:
        if event["type"] == "error":
            raise APIError(event["status"], event["message"], event.get("param"), type_=event.get("error_type"))
        reply.add(event)
        if event["type"] == "done":
            return reply.whole()
        event = await _next(request, job, events)


DISCONNECT_CHECK_S = 0.5  # how often a whole (non-streamed) request checks that its client is still there


async def _next(request: Request, job: Job, events: asyncio.Queue) -> dict:
    """The job's next event; cancels the job when the client has gone (ClientGone), checked at
    least every DISCONNECT_CHECK_S however fast the events come."""
    loop = asyncio.get_running_loop()
    while True:
        if loop.time() - job.watched_at >= DISCONNECT_CHECK_S:
            job.watched_at = loop.time()
            if await request.is_disconnected():
                job.cancelled.set()
                raise ClientGone()
        try:
            return await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_S)
        except asyncio.TimeoutError:
            continue


async def _stream(request: Request, job: Job, events: asyncio.Queue, first: dict, reply: _Reply, include_usage: bool):
    """Server-sent events, OpenAI's chunks; the job is cancelled if the client goes away."""
    try:
        if reply.kind == "chat.completion":
            yield _sse(reply.chunk(role=True))
        event = first
        while True:
            if event["type"] == "error":  # after the response began: an error object in the stream
                yield _sse(error_body(event["message"], event.get("error_type") or "server_error", event["status"]))
                break
            if event["type"] == "token":
                if event["text"] or "logprob" in event:
                    yield _sse(reply.chunk(event=event))
            else:
                yield _sse(reply.chunk(finish=event))
                if include_usage:
                    yield _sse(reply.usage_chunk(event))
                break
            event = await events.get()
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op once the job has ended; stops it when the client disconnected


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Reply:
    """Builds a response's JSON (whole or chunked) from the engine's events."""

    def __init__(self, kind: str, model: str, logprobs: bool):
        self.kind, self.model, self.logprobs = kind, model, logprobs
        self.id = new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
        self.created = now()
        self.text: list[str] = []
        self.chars = 0  # len("".join(self.text)), kept as chunks come
        self.lps: list[dict] = []
        self.done: dict | None = None

    def add(self, event: dict) -> None:
        if event["type"] == "token":
            self.text.append(event["text"])
            self.chars += len(event["text"])
            if "logprob" in event:
                self.lps.append(event["logprob"])
        else:
            self.done = event

    def _logprobs(self, entries: list[dict], at: int = 0):
        """OpenAI's logprobs object for ``entries``, the first of which starts at character ``at``."""
        if not self.logprobs:
            return None
        if self.kind == "chat.completion":
            return {"content": entries}
        offsets = []
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": f"streamingllm-{__version__}"}

    def whole(self) -> dict:
        text, done = "".join(self.text), self.done
        if self.kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": self._logprobs(self.lps),
                      "finish_reason": _finish(done)}
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(self.lps), "finish_reason": _finish(done)}
        out = {**self._head(self.kind), "choices": [choice], "usage": done["usage"]}
        if done.get("session"):
            out["session"] = done["session"]
        return out

    def chunk(self, role: bool = False, event: dict | None = None, finish: dict | None = None) -> dict:
        chat = self.kind == "chat.completion"
        at = self.chars
        if event is not None:
            self.text.append(event["text"])
            self.chars += len(event["text"])
        lp = self._logprobs([event["logprob"]], at) if event is not None and "logprob" in event else None
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": event["text"]} if event else {})
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": _finish(finish) if finish else None}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": event["text"] if event else "", "logprobs": lp,
                      "finish_reason": _finish(finish) if finish else None}
            out = {**self._head("text_completion"), "choices": [choice]}
        if finish is not None and finish.get("session"):
            out["session"] = finish["session"]
        return out

    def usage_chunk(self, done: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": done["usage"]}


def _finish(done: dict) -> str:
    """OpenAI's finish reasons: a cancelled reply ended like one cut by length."""
    return {"stop": "stop", "length": "length"}.get(done["finish_reason"], "length")
