"""The FastAPI application: OpenAI-compatible routes over the engine, the chat page, metrics.

Each route takes the :class:`~.serving.OpenAIServing` from ``app.state.serving`` and calls it:
the serving object turns a request into an engine job and the job's events into OpenAI's
responses (one JSON body, or server-sent events ending with ``data: [DONE]``). This module
builds the application: the body-size and API-key guard, the error handlers (every error is
OpenAI's JSON error object with a fitting status code) and the routes. The checks that come
before any route (Host, API key, body size, 500s that name an id) are :class:`~.guard.Guard`'s.
There is no ``/docs`` page (it would load scripts from a CDN); ``/openapi.json`` describes the API.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .engine import Engine
from .guard import Guard
from .logs import install_redaction
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, RequestDefaults, SessionRequest, error_body
from .serving import DISCONNECT_CHECK_S, ERROR_TYPES, APIError, ClientGone, OpenAIServing  # noqa: F401 (re-exported)
from .sessions import SessionStore


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_ or ERROR_TYPES.get(status, "invalid_request_error"), None, param),
                        status_code=status, headers=headers)


def create_app(engine: Engine, store: SessionStore, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = 8 << 20, retry_after: int = 2,
               allowed_hosts: Iterable[str] | None = None, defaults: RequestDefaults | None = None) -> FastAPI:
    """The application serving ``engine`` (already started) as ``model_name``.

    Args:
        api_key: when given, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        max_body_bytes: request bodies larger than this are refused (413; bytes), counted as they arrive.
        retry_after: seconds a client is told to wait when the server is overloaded (503).
        allowed_hosts: the names the ``Host`` header may give (``*`` any, ``*.example.org``
            subdomains); None takes any (400 otherwise).
        defaults: what requests get for the sampling fields they leave unset, and their
            ``max_tokens`` limit (None: :class:`~.serving.OpenAIServing`'s).
    """
    install_redaction()
    app = FastAPI(title="streamingllm", version=__version__, docs_url=None, redoc_url=None)
    app.state.engine, app.state.store, app.state.model_name = engine, store, model_name
    app.state.serving = OpenAIServing(engine, store, model_name, retry_after, defaults)
    app.state.metrics = metrics = Metrics(lambda: {**store.counts(), **engine.load})
    engine.metrics = metrics

    app.add_middleware(Guard, error_response=error_response, on_error=metrics.error, max_body_bytes=max_body_bytes,
                       api_key=api_key, allowed_hosts=allowed_hosts)

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

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.error(exc.status)
        return error_response(exc.status, str(exc), exc.type, exc.param, exc.headers)

    attach_router(app)
    return app


router = APIRouter()


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


@cache
def chat_page() -> tuple[str, str]:
    """The chat page's HTML, and its Content-Security-Policy: its own inline script and style (by
    their SHA-256), requests to this server only, no frames, no plugins."""
    html = resources.files(__package__).joinpath("static/index.html").read_text()

    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                        for m in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S))

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
    return html, csp


@router.get("/", include_in_schema=False)
async def page():
    html, csp = chat_page()
    return HTMLResponse(html, headers={"Content-Security-Policy": csp})


@router.get("/health")
async def health(request: Request):
    return _serving(request).health()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request):
    return _serving(request).models().model_dump()


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    return _serving(request).model_card(model_id).model_dump()


@router.post("/v1/sessions")
async def create_session(request: Request, body: SessionRequest | None = None):
    # the id a replicated server's ingress chose (request.state is set by the server, never a client)
    sid = getattr(request.state, "assigned_session_id", None)
    return _serving(request).create_session(pin_system=bool(body and body.pin_system), sid=sid)


@router.get("/v1/sessions/{sid}")
async def get_session(request: Request, sid: str):
    return _serving(request).describe_session(sid)


@router.delete("/v1/sessions/{sid}")
async def delete_session(request: Request, sid: str):
    return _serving(request).delete_session(sid)


@router.post("/v1/chat/completions")
async def chat(request: Request, body: ChatCompletionRequest):
    return await _serving(request).chat(body, request)


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest):
    return await _serving(request).completion(body, request)


def attach_router(app: FastAPI) -> None:
    """Add the routes: each one calls the application's :class:`~.serving.OpenAIServing`."""
    app.include_router(router)
