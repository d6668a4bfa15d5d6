"""The server's outermost checks, as a pure ASGI middleware (:class:`Guard`).

In order, before the application runs:

1. the ``Host`` header must name this server (``allowed_hosts``), so a page whose name a DNS
   rebinding points at 127.0.0.1 cannot reach it (400);
2. ``/v1/*`` needs ``Authorization: Bearer <api_key>`` when there is a key (401);
3. the body is read here, counted as it streams in, and refused (413, connection closed) as soon
   as it passes ``max_body_bytes``: a declared ``Content-Length`` is refused before a byte is
   read, a chunked body when its bytes pass the limit.

Then the application runs, with the body handed on and ``receive`` passed through untouched, so
``Request.is_disconnected()`` sees a client that went away (Starlette's ``BaseHTTPMiddleware``
hides that). Every response gets ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``
and ``Referrer-Policy: no-referrer``. An exception that escapes the application is answered with
a 500 naming an id, its traceback logged under that id (:func:`.logs.internal_error`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .logs import internal_error

SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"))


def host_name(host: str) -> str:
    """A ``Host`` header's (or a ``--host``'s) name: lower case, without port and IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


def host_allowed(name: str, allowed: Iterable[str]) -> bool:
    """``name`` (from :func:`host_name`) matches one of ``allowed``: a name, ``*`` (any), or
    ``*.example.org`` (its subdomains)."""
    for pattern in allowed:
        if pattern == "*" or pattern == name or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class BodyTooLarge(Exception):
    """The request body passed the limit while it was being read."""


class SecuredSend:
    """``send`` adding SECURITY_HEADERS to the response's start; ``started`` once it was sent."""

    def __init__(self, send: Send):
        self.send, self.started = send, False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
        await self.send(message)


class Guard:
    """The checks above, around an ASGI application.

    Args:
        app: the application.
        error_response: ``error_response(status, message, headers=None)``: an ASGI response in
            OpenAI's error format.
        on_error: ``on_error(status)``: called for each request this guard refuses or answers with
            a 500 (the metrics).
        max_body_bytes: request bodies larger than this are refused (413; bytes).
        api_key: required on ``/v1/*`` as a bearer token (None: no key).
        allowed_hosts: names the ``Host`` header may give (see :func:`host_allowed`), or None for any.
    """

    def __init__(self, app: ASGIApp, *, error_response: Callable, on_error: Callable[[int], None],
                 max_body_bytes: int, api_key: str | None = None, allowed_hosts: Iterable[str] | None = None):
        self.app, self.error_response, self.on_error = app, error_response, on_error
        self.max_body_bytes, self.api_key = max_body_bytes, api_key
        self.allowed_hosts = None if allowed_hosts is None else tuple(host_name(h) if h != "*" else h
                                                                      for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = SecuredSend(send)
        refusal = self._refusal(scope, Headers(scope=scope))
        if refusal is not None:
            await self._refuse(scope, receive, send, *refusal)
            return
        try:
            body = await self._read_body(receive)
        except BodyTooLarge:
            await self._refuse(scope, receive, send, 413, self._too_large("passes"), {"Connection": "close"})
            return
        if body is None:  # the client went away while sending
            return

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = {"type": "http.request", "body": body, "more_body": False}, None
                return message
            return await receive()

        try:
            await self.app(scope, replay, send)
        except Exception as err:
            if send.started:
                raise
            await self._refuse(scope, receive, send, 500, internal_error(err))

    def _refusal(self, scope: Scope, headers: Headers) -> tuple | None:
        """``(status, message, headers)`` when the request is refused on its headers, else None."""
        if self.allowed_hosts is not None:
            name = host_name(headers.get("host", ""))
            if not host_allowed(name, self.allowed_hosts):
                return 400, (f"the Host header {name!r} is not a name of this server; it answers to "
                             f"{', '.join(self.allowed_hosts)} (--allowed-hosts)"), None
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return 401, "a valid API key is required: Authorization: Bearer <key>", None
        size = headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            return 413, self._too_large(f"has {size} bytes, which passes"), {"Connection": "close"}
        return None

    def _too_large(self, what: str) -> str:
        return f"the request body {what} this server's limit of {self.max_body_bytes} bytes (--max-body-mib)"

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body (BodyTooLarge as soon as it passes the limit; None on a disconnect)."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_body_bytes:
                raise BodyTooLarge()
            parts.append(part)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str,
                      headers: dict | None = None) -> None:
        self.on_error(status)
        await self.error_response(status, message, headers=headers)(scope, receive, send)
