"""What the engine is asked and what it answers: typed, and free of HTTP and of OpenAI's format.

* :class:`GenerationRequest` (frozen): what a client asked for, already checked and translated
  (``ChatCompletionRequest.to_generation`` in :mod:`.protocol`).
* :class:`Job`: a request handed to the engine, with the session it claimed, where its events go,
  and the flag that cancels it. The worker's own state for it is :class:`.engine.JobState`.
* The events a job emits, in order: :class:`TokenText` per reply token, then one
  :class:`Finished` or one :class:`Failed`. :mod:`.serving` turns them into OpenAI's responses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..sampling import Sampling
from .sessions import Entry

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerationRequest:
    """What a client asked for: what to feed and how to generate.

    Attributes:
        messages: the conversation, ``{"role", "content"}`` dicts (chat), or None for a text completion.
        prompt: the text to continue (text completion), or None.
        sampling: how tokens are chosen (penalties included).
        max_tokens: most tokens in the reply (>= 1).
        min_tokens: the end-of-turn tokens are suppressed for this many reply tokens (>= 0).
        stop: strings that end the shown reply.
        top_logprobs: None for no log-probabilities, else how many alternatives per token (>= 0).
    """

    messages: list[dict] | None
    prompt: str | None
    sampling: Sampling
    max_tokens: int
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A reply token's log-probability under the model's own distribution (before penalties and
    temperature), and the most likely tokens' (most likely first)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TokenText:
    """A reply token's text to show now ('' while held back), and its log-probabilities when asked
    for (None for the held-back text shown when a reply ends)."""

    text: str
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class SessionReport:
    """A session's numbers after a request, as a response's ``session`` field shows them.

    Attributes:
        id: the session id.
        status: ``"new"``, ``"continued"``, ``"rebuilt"`` or ``"restored"`` (:class:`~streamingllm.session.Turn`).
        evicted: ``"saved"`` or ``"dropped"`` when the session was evicted since its last request.
        seen_tokens, cached_tokens, max_cached_tokens: the cache's numbers (tokens).
        pinned_tokens: system-prompt tokens kept as sinks.
    """

    id: str
    status: str
    evicted: str | None
    seen_tokens: int
    cached_tokens: int
    max_cached_tokens: int
    pinned_tokens: int


@dataclass(frozen=True)
class Finished:
    """The reply has ended (and its session's turn is closed and saved).

    Attributes:
        reason: ``"stop"`` (an end-of-turn token or a stop string), ``"length"`` (``max_tokens``)
            or ``"cancelled"`` (the client went away).
        prompt_tokens: the conversation's tokens, cached ones included.
        cached_tokens: those of them held by the session from before (not fed again).
        completion_tokens: the reply's tokens.
        session: the session's numbers, or None for a request without a session.
    """

    reason: FinishReason
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    session: SessionReport | None = None


@dataclass(frozen=True)
class Failed:
    """The request failed: an HTTP status, a message, OpenAI's error type and the parameter at fault."""

    status: int
    message: str
    error_type: str = "invalid_request_error"
    param: str | None = None


Event = TokenText | Finished | Failed


@dataclass
class Job:
    """A request on its way through the engine.

    Attributes:
        request: what the client asked for.
        emit: ``emit(event)``, called from the worker thread for each :data:`Event`.
        entry: the session the request claimed (chat with a session id), or None.
        created: when it arrived (``time.perf_counter()`` seconds), for the latency metrics.
        cancelled: set by the HTTP side when the client has gone; the worker ends the job.
    """

    request: GenerationRequest
    emit: Callable[[Event], None]
    entry: Entry | None = None
    created: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
