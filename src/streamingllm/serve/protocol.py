"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Fields follow OpenAI's chat and completions APIs, in their order. Request extensions, which the
``openai`` client sends through ``extra_body``, are marked: ``session_id``, ``top_k``,
``repetition_penalty``, ``min_tokens``; the one response extension is ``session`` (a
:class:`~.jobs.SessionReport`). Unknown request fields are ignored, as OpenAI's own server does
for clients newer than it. A request translates itself into the engine's
:class:`~.jobs.GenerationRequest` (:meth:`ChatCompletionRequest.to_generation`).

Responses serialise with ``model_dump()`` to the JSON OpenAI sends: optional fields are written
as ``null``, except those OpenAI leaves out (:class:`OpenAIResponse` ``omit_when_none``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from ..sampling import Sampling
from .jobs import GenerationRequest, SessionReport

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_TOP_LOGPROBS = 20


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        """``{"role", "content"}`` with text parts joined; OpenAI's ``developer`` role is the system prompt."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationParams(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1, description="most tokens in the reply")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="one choice per request (a stream has one continuation)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # extensions
    session_id: str | None = Field(None, description="streamingllm: the session whose cache continues")
    top_k: int = Field(0, ge=0, description="streamingllm: keep the k most likely tokens (0 = all)")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0,
                                      description="streamingllm: llama.cpp's and transformers' penalty")
    min_tokens: int = Field(0, ge=0, description="streamingllm: the end of turn is suppressed for this many tokens")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings")
        return stops

    def sampling(self, penalty_last_n: int) -> Sampling:
        """The request's :class:`Sampling`; temperatures below 1e-3 are greedy (dividing by them
        overflows)."""
        return Sampling(temperature=0.0 if self.temperature < 1e-3 else self.temperature, top_k=self.top_k,
                        top_p=self.top_p, seed=self.seed, repetition_penalty=self.repetition_penalty,
                        presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                        penalty_last_n=penalty_last_n)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _generation(self, penalty_last_n: int, default_max_tokens: int, **what) -> GenerationRequest:
        """The engine's request for these settings and ``what`` to feed (``messages`` or ``prompt``);
        ValueError (an :class:`~streamingllm.checks.ArgumentError`) for a setting the library refuses."""
        return GenerationRequest(sampling=self.sampling(penalty_last_n),
                                 max_tokens=self.reply_limit or default_max_tokens, min_tokens=self.min_tokens,
                                 stop=tuple(self.stop), **what)


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_generation(self, penalty_last_n: int, default_max_tokens: int) -> GenerationRequest:
        """What the engine runs for this request (``default_max_tokens`` when it gives no limit)."""
        return self._generation(penalty_last_n, default_max_tokens, messages=[m.as_dict() for m in self.messages],
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
        return v

    @property
    def reply_limit(self) -> int | None:
        return self.max_tokens

    def to_generation(self, penalty_last_n: int, default_max_tokens: int) -> GenerationRequest:
        """What the engine runs for this request (``default_max_tokens`` when it gives no limit)."""
        return self._generation(penalty_last_n, default_max_tokens, messages=None, prompt=self.prompt,
                                top_logprobs=self.logprobs)


class SessionRequest(BaseModel):
    """``POST /v1/sessions``: a new conversation."""

    model_config = ConfigDict(extra="forbid")

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
