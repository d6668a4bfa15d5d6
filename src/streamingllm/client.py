"""Conversations as a chat front end sees them, and the HTTP client for a running server.

:class:`Conversation` is the one interface of a conversation, held here or by a server: send a
user message and read the reply as it streams, read the cache's numbers, start again, and save
or load where the cache is in this process. :class:`~streamingllm.session.Session` (the cache in
this process) and :class:`RemoteSession` (the cache in a ``streamingllm serve``) both satisfy it;
what differs between them is said by their attributes (:attr:`Conversation.interruptible`,
:attr:`Conversation.can_save`), so a front end never asks which one it holds.

:class:`RemoteSession` talks to the server's OpenAI-compatible API (see docs/serving.md): the
conversation lives in a server session (``POST /v1/sessions``), every turn sends the whole message
list with that ``session_id`` and the server feeds only what is new. Replies are read as
server-sent events, line by line; closing a reply closes the connection, which the server takes
as a cancellation. Standard library only (``urllib.request``, ``json``).

    with RemoteSession("http://127.0.0.1:8000", system="Answer briefly.") as chat:
        print("".join(chat.reply("What is the capital of France?")), chat.stats())
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .checks import ArgumentError

if TYPE_CHECKING:
    from .feed import Sampling


@runtime_checkable
class Conversation(Protocol):
    """One conversation on a bounded cache, wherever the cache is.

    Attributes:
        messages: the conversation so far (system, user and assistant messages, OpenAI-style
            ``{"role", "content"}`` dicts), each reply as it was shown.
        interruptible: True when a reply may be abandoned while it waits for its next piece (a
            ``KeyboardInterrupt`` there is safe: a server's reply is cancelled when its connection
            closes). False when a reply must be stopped between two pieces only, by closing its
            generator (a local reply would stop in the middle of a forward pass and leave the
            cache half-written).
        can_save: True when :meth:`save` and :meth:`load` work (the cache's state is in this
            process); False when they raise ``io.UnsupportedOperation``.
    """

    messages: list[dict]
    interruptible: bool
    can_save: bool

    def reply(self, user_text: str) -> Iterator[str]:
        """Add the user's message and yield the reply as text pieces as they come. Closing the
        generator stops the reply; the conversation keeps it as far as it was yielded."""
        ...

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        ...

    def stats(self, refresh: bool = False) -> dict[str, int]:
        """The cache's numbers, in tokens: ``seen_tokens`` (the whole conversation),
        ``cached_tokens`` (held now), ``max_cached_tokens`` (the cache's size), ``pinned_tokens``
        (system-prompt tokens kept as sinks) and ``turns`` (user messages). ``refresh``: ask for
        them again where they are kept elsewhere (a server); a local cache's are always current."""
        ...

    def save(self, path) -> None:
        """Write the conversation and the cache's exact state to the file ``path``."""
        ...

    def load(self, path) -> None:
        """Continue the conversation :meth:`save` wrote to ``path``."""
        ...


class ServerError(ValueError):
    """The server answered with an error (its message is shown), or with something that is not
    its API.

    Attributes:
        status: the HTTP status (None when the answer was not an HTTP error).
        param: the request field the error names, if any (OpenAI's ``error.param``).
    """

    def __init__(self, message: str, status: int | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class ServerUnreachableError(ConnectionError):
    """No connection to the server (refused, unknown host, timed out, closed early)."""


def _loopback(host: str | None) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_url(url: str) -> str:
    """``url`` checked (``http://`` or ``https://`` with a host) and without a trailing ``/`` or
    ``/v1``: the base the API paths go after. :class:`~streamingllm.checks.ArgumentError` naming
    ``url`` otherwise."""
    parts = urllib.parse.urlsplit(url.strip()) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ArgumentError("url", "must be an http:// or https:// URL such as http://127.0.0.1:8000", url)
    base = url.strip().rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


class RemoteSession:
    """A :class:`Conversation` held by a running ``streamingllm serve``; connects when made.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is fine).
        api_key: sent as ``Authorization: Bearer <api_key>`` (None: no header).
        system: the system prompt, first in every request (None: none).
        pin_system: ask the server to keep the whole system prompt as attention sinks.
        session_id: continue this existing server session instead of opening a new one: its
            transcript (``GET /v1/sessions/{id}``), system prompt and pinning are adopted, and
            ``system`` and ``pin_system`` are not used. :class:`ServerError` (status 404) when the
            server knows no such session.
        sampling: a :class:`~streamingllm.feed.Sampling` (None: greedy); its ``penalty_last_n``
            is the server's to choose and is not sent.
        max_new_tokens: most tokens per reply (``max_tokens``).
        min_new_tokens: the end of turn is suppressed for this many tokens (``min_tokens``).
        stop: strings that end a reply; the reply is shown up to them (at most 4, the server's limit).
        timeout: seconds to wait for the server on the small requests (a reply is waited for as
            long as it takes: it may queue, and a long prompt takes time to read).
        busy_wait: seconds a reply waits for the server to release the session when it is still
            finishing the previous request (a reply stopped early).

    Attributes:
        url: the server's base URL, as :func:`server_url` writes it.
        model: the served model's name (``GET /v1/models``).
        sink_size, window_size: each server session's cache, in tokens (``GET /health``).
        session_id: the server session holding this conversation (None once closed).
        messages: the conversation so far (system, user and assistant messages), as sent.
        info: the server's last numbers for the session: ``seen_tokens``, ``cached_tokens``,
            ``max_cached_tokens``, ``pinned_tokens`` (and ``turns`` after :meth:`refresh`).

    Errors: :class:`ServerUnreachableError` (an ``OSError``) when there is no connection,
    :class:`ServerError` (a ``ValueError``) with the server's message when it refuses.
    As a context manager, it deletes its server session on leaving (:meth:`close`), unless
    :meth:`keep` was called: then the session stays on the server, to be continued with
    ``session_id``.
    """

    interruptible = True  # closing the connection cancels the reply on the server
    can_save = False  # the cache is the server's

    def __init__(self, url: str, api_key: str | None = None, *, system: str | None = None, pin_system: bool = False,
                 sampling: Sampling | None = None, max_new_tokens: int = 256, min_new_tokens: int = 0,
                 stop: tuple[str, ...] | list[str] = (), timeout: float = 30.0, busy_wait: float = 30.0,
                 session_id: str | None = None):
        self.url = server_url(url)
        self.api_key, self.system, self.pin_system = api_key, system, pin_system
        self.sampling, self.max_new_tokens, self.min_new_tokens = sampling, max_new_tokens, min_new_tokens
        self.stop = list(stop)
        self.timeout, self.busy_wait = timeout, busy_wait
        host = urllib.parse.urlsplit(self.url).hostname
        handlers = [urllib.request.ProxyHandler({})] if _loopback(host) else []  # no proxy for this machine
        self._opener = urllib.request.build_opener(*handlers)
        health = self._json("GET", "/health")
        self.sink_size, self.window_size = health.get("sink_size"), health.get("window_size")
        models = self._json("GET", "/v1/models").get("data") or []
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise ServerError(f"the server at {self.url} lists no model at /v1/models")
        self.model: str = models[0]["id"]
        self.session_id: str | None = None
        self._keep = False
        if session_id is None:
            self.reset()
        else:
            self._adopt(session_id)

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the Conversation ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays): a new server session; the old one
        is deleted on the server."""
        old = self.session_id
        self.session_id = self._new_session()
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.info: dict = {}
        self._unsettled = False  # a reply stopped early: the server's transcript may be longer
        if old is not None:
            self._delete(old)

    def reply(self, user_text: str) -> Iterator[str]:
        """Add the user's message, and yield the assistant's reply as text pieces as they come.

        Closing the generator (``close()``) closes the connection, so the server stops the reply;
        the conversation keeps the reply as far as it was yielded. A request the server refuses
        (:class:`ServerError`) leaves the conversation as it was.
        """
        if not isinstance(user_text, str) or not user_text.strip():
            raise ArgumentError("user_text", "must be a non-empty message", user_text)
        if self._unsettled:
            self._settle()
        messages = self.messages + [{"role": "user", "content": user_text}]
        response = self._open_reply(messages)
        shown: list[str] = []
        done = False
        try:
            for chunk in self._events(response):
                if isinstance(chunk.get("error"), dict):
                    raise ServerError(f"the server failed the reply: {chunk['error'].get('message')}")
                if isinstance(chunk.get("session"), dict):
                    self.info = dict(chunk["session"])
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        shown.append(piece)
                        yield piece
            done = True
        except (OSError, http.client.HTTPException) as err:
            raise ServerError(f"the connection to the server at {self.url} broke during the reply: "
                              f"{_reason(err)}") from None
        finally:
            response.close()  # the server cancels a reply whose client has gone
            self.messages = messages + [{"role": "assistant", "content": "".join(shown)}]
            self._unsettled = not done

    def stats(self, refresh: bool = False) -> dict[str, int]:
        """``seen_tokens``, ``cached_tokens``, ``max_cached_tokens``, ``pinned_tokens`` and ``turns``
        (tokens; turns are user messages). Without ``refresh``, as last known (no request): the
        numbers of the last reply's final chunk, zeros before the first reply, the turns counted
        here. With ``refresh``, asked from the server first (:meth:`refresh`)."""
        if refresh:
            self.refresh()
        room = (self.sink_size or 0) + (self.window_size or 0)
        turns = sum(m["role"] == "user" for m in self.messages)
        return {"seen_tokens": self.info.get("seen_tokens", 0), "cached_tokens": self.info.get("cached_tokens", 0),
                "max_cached_tokens": self.info.get("max_cached_tokens", room),
                "pinned_tokens": self.info.get("pinned_tokens", 0), "turns": self.info.get("turns", turns)}

    def save(self, path) -> None:
        """Not available: the cache is on the server. Raises ``io.UnsupportedOperation``."""
        raise io.UnsupportedOperation(f"a RemoteSession cannot save: the cache is on the server at {self.url}")

    def load(self, path) -> None:
        """Not available: the cache is on the server. Raises ``io.UnsupportedOperation``."""
        raise io.UnsupportedOperation(f"a RemoteSession cannot load: the cache is on the server at {self.url}")

    # --- the server's numbers --------------------------------------------------------------------

    def refresh(self, wait_s: float = 10.0) -> dict:
        """The server's current numbers for the session (``GET /v1/sessions/{id}``), kept in :attr:`info`.

        After a reply stopped early the server closes the turn with what it generated, which may
        be a token or two more than was shown here: the server's transcript is adopted, so the
        next request continues the session instead of rebuilding it. Waits up to ``wait_s``
        seconds for the server to finish that turn.
        """
        deadline = time.monotonic() + wait_s
        while True:
            described = self._json("GET", f"/v1/sessions/{urllib.parse.quote(self.session_id)}")
            if not described.get("busy") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if "seen_tokens" in described:
            self.info = {k: v for k, v in described.items() if k != "messages"}
        if isinstance(described.get("messages"), list) and not described.get("busy"):
            self.messages = described["messages"]
            self._unsettled = False
        return self.info

    def keep(self) -> None:
        """Leave the server session on the server when this conversation closes (with the server's
        ``--state-dir`` it outlives eviction and restarts); continue it with ``session_id``."""
        self._keep = True

    def close(self) -> None:
        """Delete the server session (best effort: a server already gone is fine), unless
        :meth:`keep` was called; either way this object is done with it."""
        if self.session_id is not None and not self._keep:
            self._delete(self.session_id)
        self.session_id = None

    def _adopt(self, sid: str) -> None:
        """Continue the existing server session ``sid``: its transcript, system prompt and pinning."""
        if not isinstance(sid, str) or not sid.strip():
            raise ArgumentError("session_id", "must be a non-empty server session id", sid)
        self.session_id = sid
        self.info: dict = {}
        self._unsettled = False
        described = self._json("GET", f"/v1/sessions/{urllib.parse.quote(sid)}")
        messages = described.get("messages")
        if not isinstance(messages, list):
            raise ServerError(f"the server at {self.url} gave no transcript for session {sid!r}")
        self.messages: list[dict] = messages
        self.pin_system = bool(described.get("pin_system", False))
        first = messages[0] if messages and isinstance(messages[0], dict) else {}
        self.system = first.get("content") if first.get("role") == "system" else None
        self.info = {k: v for k, v in described.items() if k != "messages"}

    # --- HTTP ----------------------------------------------------------------------------------

    def _settle(self) -> None:
        """Adopt the server's transcript after a reply stopped early; without it (the server is
        slow or gone) the next request still works: the server rebuilds the session."""
        try:
            self.refresh()
        except (ServerError, OSError):
            pass

    def _new_session(self) -> str:
        sid = self._json("POST", "/v1/sessions", {"pin_system": bool(self.pin_system)}).get("id")
        if not isinstance(sid, str):
            raise ServerError(f"the server at {self.url} gave no session id")
        return sid

    def _delete(self, sid: str) -> None:
        try:
            self._json("DELETE", f"/v1/sessions/{urllib.parse.quote(sid)}")
        except (ServerError, OSError):
            pass

    def _body(self, messages: list[dict]) -> dict:
        s = self.sampling
        body = {"model": self.model, "messages": messages, "stream": True, "session_id": self.session_id,
                "max_tokens": self.max_new_tokens, "min_tokens": self.min_new_tokens, "stop": self.stop}
        if s is None:  # greedy, whatever the server's defaults for the settings a request leaves unset
            from .sampling import Sampling

            s = Sampling()
        body.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                    presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                    repetition_penalty=s.repetition_penalty)
        if s.seed is not None:
            body["seed"] = s.seed
        return body

    def _open_reply(self, messages: list[dict]) -> http.client.HTTPResponse:
        """The streamed response to a chat request. Waits while the session is still busy with the
        previous (stopped) reply; a session the server no longer knows (restarted without a state
        directory) is replaced once, and the server rebuilds it from the messages."""
        deadline, replaced = time.monotonic() + self.busy_wait, False
        while True:
            try:
                return self._send("POST", "/v1/chat/completions", self._body(messages), timeout=None)
            except ServerError as err:
                if err.param == "session_id" and err.status == 409 and time.monotonic() < deadline:
                    time.sleep(0.2)
                elif err.param == "session_id" and err.status == 404 and not replaced:
                    self.session_id, replaced = self._new_session(), True
                else:
                    raise

    def _send(self, method: str, path: str, body: dict | None = None, timeout: float | None = 30.0):
        """The open response to one request; errors as :class:`ServerError` or :class:`ServerUnreachableError`."""
        headers = {"Accept": "application/json, text/event-stream"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            return self._opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            error = _http_error(err, method, path, self.url)
            err.close()
            raise error from None
        except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
            raise ServerUnreachableError(f"cannot reach the server at {self.url}: {_reason(err)}") from None

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._send(method, path, body, timeout=self.timeout) as response:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException) as err:
                raise ServerUnreachableError(f"cannot reach the server at {self.url}: {_reason(err)}") from None
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ServerError(f"the server at {self.url} did not answer {method} {path} with a JSON object; "
                              "is it a streamingllm serve?")
        return answer

    def _events(self, response) -> Iterator[dict]:
        """The JSON objects of a server-sent event stream, read line by line, until ``data: [DONE]``."""
        data: list[str] = []
        while True:
            raw = response.readline()
            if not raw:
                raise ServerError(f"the server at {self.url} ended the reply's stream before [DONE]")
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line:  # an event ends
                if data:
                    text, data = "\n".join(data), []
                    if text.strip() == "[DONE]":
                        return
                    try:
                        event = json.loads(text)
                    except ValueError:
                        raise ServerError(f"the server at {self.url} sent an event that is not JSON: "
                                          f"{text[:200]!r}") from None
                    if isinstance(event, dict):
                        yield event
                continue
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value[1:] if value.startswith(" ") else value)


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) if isinstance(err, urllib.error.URLError) else None
    reason = reason if reason is not None else err
    return str(reason) or type(reason).__name__


def _http_error(err: urllib.error.HTTPError, method: str, path: str, url: str) -> ServerError:
    """The server's error message (OpenAI's error object) as a :class:`ServerError`."""
    message, param = None, None
    try:
        answer = json.loads(err.read())
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict):
            message, param = error.get("message"), error.get("param")
        elif isinstance(answer, dict) and isinstance(answer.get("detail"), str):
            message = answer["detail"]
    except (ValueError, OSError, http.client.HTTPException):
        pass
    message = message or err.reason or "no message"
    hint = " (give it with --api-key or $STREAMINGLLM_API_KEY; api_key in Python)" if err.code == 401 else ""
    return ServerError(f"the server at {url} answered {err.code} to {method} {path}: {message}{hint}", err.code, param)
