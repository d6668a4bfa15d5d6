"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Fields follow OpenAI's chat and completions APIs, in their order. Request extensions, which the
``openai`` client sends through ``extra_body``, are marked: ``session_id``, ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``; the one response extension is ``session`` (a
:class:`~.jobs.SessionReport`). Unknown request fields are ignored, as OpenAI's own server does
for clients newer than it; known ones are typed strictly, as OpenAI's schema types them (``"stream":
"yes"`` or ``"max_tokens": "5"`` are refused, not converted). A request translates itself into the
engine's :class:`~.jobs.GenerationRequest` (:meth:`ChatCompletionRequest.to_generation`): the
sampling settings it leaves unset (or null) take the server's :class:`RequestDefaults`.

Responses serialise with ``model_dump()`` to the JSON OpenAI sends: optional fields are written
as ``null``, except those OpenAI leaves out (:class:`OpenAIResponse` ``omit_when_none``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from ..checks import ArgumentError
from ..sampling import Sampling
from .jobs import GenerationRequest, SessionReport

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_TOP_LOGPROBS = 20
INT64 = 2**63  # OpenAI's seed is a signed 64-bit integer

LOCAL_SAMPLING = Sampling(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, penalty_last_n=64)
"""The server's sampling for requests that leave it unset, when the model recommends none: the
common choice of local servers for small models (llama.cpp's server)."""


@dataclass(frozen=True)
class RequestDefaults:
    """What a request gets for what it leaves unset, and the most it may ask for.

    Attributes:
        sampling: the settings of each sampling field a request leaves unset (its ``seed`` unused;
            ``penalty_last_n``, in tokens, is the server's for every request).
        max_tokens: the reply limit of a request that gives none (tokens).
        max_tokens_limit: the most ``max_tokens``, ``max_completion_tokens`` and ``min_tokens`` a
            request may ask for (tokens; 400 beyond).
    """

    sampling: Sampling = LOCAL_SAMPLING
    max_tokens: int = 512
    max_tokens_limit: int = 4096

    def describe(self) -> dict:
        """The defaults as ``/health`` shows them (request field names)."""
        s = self.sampling
        return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
                "repetition_penalty": s.repetition_penalty, "presence_penalty": s.presence_penalty,
                "frequency_penalty": s.frequency_penalty, "penalty_last_n": s.penalty_last_n,
                "max_tokens": self.max_tokens, "max_tokens_limit": self.max_tokens_limit}


def check_text(text: str, what: str) -> str:
    """``text`` when it can be encoded as UTF-8; ValueError naming ``what`` for a lone UTF-16
    surrogate (JSON's ``"\\ud800"`` decodes to one, and no tokenizer takes it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} must be valid Unicode: a lone surrogate "
                         f"({ascii(text[err.start])[1:-1]}) at character {err.start}") from None
    return text


class StrictModel(BaseModel):
    """A request body typed as strictly as OpenAI's schema: no "yes" for true, no "5" for 5."""

    model_config = ConfigDict(strict=True)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _unicode(cls, v):
        for text in [v] if isinstance(v, str) else [p.text for p in v]:
            check_text(text, "content")
        return v

    def as_dict(self) -> dict:
        """``{"role", "content"}`` with text parts joined; OpenAI's ``developer`` role is the system prompt."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(StrictModel):
    include_usage: bool = False


SAMPLING_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                   "repetition_penalty")
"""The request fields that are :class:`Sampling`'s (same names); unset, they take the server's."""


class GenerationParams(StrictModel):
    """Fields shared by chat and text completions. The sampling fields (SAMPLING_FIELDS) are None
    when the request leaves them unset: the server's :class:`RequestDefaults` fill them."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1, description="most tokens in the reply")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="one choice per request (a stream has one continuation)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None
    # extensions
    session_id: str | None = Field(None, description="streamingllm: the session whose cache continues")
    top_k: int | None = Field(None, ge=0, description="streamingllm: keep the k most likely tokens (0 = all)")
    min_p: float | None = Field(None, ge=0.0, le=1.0,
                                description="streamingllm: keep tokens at least min_p times as likely as the top one")
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0,
                                             description="streamingllm: llama.cpp's and transformers' penalty")
    min_tokens: int = Field(0, ge=0, description="streamingllm: the end of turn is suppressed for this many tokens")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings")
        return [check_text(stop, "stop") for stop in stops]

    def sampling(self, defaults: Sampling) -> Sampling:
        """The request's :class:`Sampling`: each field it sets, exactly, and ``defaults`` for the
        others (and ``defaults.penalty_last_n``). Temperatures below 1e-3 are greedy (dividing by
        them overflows)."""
        given = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        sampling = replace(defaults, seed=self.seed, **given)
        return replace(sampling, temperature=0.0) if sampling.temperature < 1e-3 else sampling

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _generation(self, defaults: RequestDefaults, **what) -> GenerationRequest:
        """The engine's request for these settings and ``what`` to feed (``messages`` or ``prompt``);
        ValueError (an :class:`~streamingllm.checks.ArgumentError` naming the field) for a value
        beyond ``defaults.max_tokens_limit`` or a setting the library refuses."""
        limit = defaults.max_tokens_limit
        for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
            value = getattr(self, name, None)
            if value is not None and value > limit:
                raise ArgumentError(name, f"must be <= {limit}, this server's limit (serve --max-tokens-limit)",
                                    value)
        return GenerationRequest(sampling=self.sampling(defaults.sampling),
                                 max_tokens=self.reply_limit or defaults.max_tokens, min_tokens=self.min_tokens,
                                 stop=tuple(self.stop), **what)


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_generation(self, defaults: RequestDefaults = RequestDefaults()) -> GenerationRequest:
        """What the engine runs for this request, ``defaults`` filling what it leaves unset."""
        return self._generation(defaults, messages=[m.as_dict() for m in self.messages],
                                prompt=None, top_logprobs=(self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(GenerationParams):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("one prompt per request")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return check_text(v, "prompt")

    @property
    def reply_limit(self) -> int | None:
        return self.max_tokens

    def to_generation(self, defaults: RequestDefaults = RequestDefaults()) -> GenerationRequest:
        """What the engine runs for this request, ``defaults`` filling what it leaves unset."""
        return self._generation(defaults, messages=None, prompt=self.prompt, top_logprobs=self.logprobs)


class SessionRequest(StrictModel):
    """``POST /v1/sessions``: a new conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pin_system: bool = Field(False, description="keep the conversation's system prompt as attention sinks")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# --- responses ----------------------------------------------------------------------------------


class OpenAIResponse(BaseModel):
    """A response body. The fields named in ``omit_when_none`` are left out when None, as OpenAI
    leaves them out (a chunk's ``usage``, a delta's ``role``); other None fields are written as null."""

    omit_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler) -> dict[str, Any]:
        data = handler(self)
        for name in self.omit_when_none:
            if data.get(name, ...) is None:
                del data[name]
        return data


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = Field(None, description="a short machine-readable code; the HTTP status in a stream")


class ErrorResponse(BaseModel):
    """OpenAI's error object."""

    error: ErrorInfo


def error_body(message: str, type_: str, code: str | int | None = None, param: str | None = None) -> dict:
    """OpenAI's error object as a dict (``code``: a short machine-readable string, or None)."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens the session held from before (not fed again)")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
        """The usage of a request that read ``prompt_tokens`` (``cached_tokens`` of them held
        from before) and wrote ``completion_tokens``."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


FinishReason = Literal["stop", "length"]


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb]


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent]


class CompletionLogProbs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] = Field(description="each token's first character in the choice's text")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class DeltaMessage(OpenAIResponse):
    omit_when_none = ("role", "content")

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionResponseChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: FinishReason


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponseChoice(BaseModel):
    """A text completion's choice, whole or in a chunk (``finish_reason`` None until the last)."""

    index: int = 0
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(OpenAIResponse):
    omit_when_none = ("session",)

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    session: SessionReport | None = Field(None, description="streamingllm: the session's numbers")


class ChatCompletionChunk(OpenAIResponse):
    omit_when_none = ("usage", "session")

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = Field(None, description="in the last chunk, with stream_options.include_usage")
    session: SessionReport | None = Field(None, description="streamingllm: in the finishing chunk")


class CompletionResponse(OpenAIResponse):
    omit_when_none = ("session",)

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    session: SessionReport | None = None  # never set: text completions are one-off


class CompletionChunk(OpenAIResponse):
    """A streamed text completion's chunk (OpenAI calls its object ``text_completion`` too)."""

    omit_when_none = ("usage", "session")

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None
    session: SessionReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "streamingllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
