"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Fields follow OpenAI's chat and completions APIs. Extensions, which the ``openai`` client sends
through ``extra_body``, are marked: ``session_id``, ``top_k``, ``repetition_penalty``,
``min_tokens``. Unknown fields are ignored, as OpenAI's own server does for clients newer than it.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..feed import Sampling

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
        return Sampling(temperature=0.0 if self.temperature < 1e-3 else self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                        repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                        frequency_penalty=self.frequency_penalty, penalty_last_n=penalty_last_n)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


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


class SessionRequest(BaseModel):
    """``POST /v1/sessions``: a new conversation."""

    model_config = ConfigDict(extra="forbid")

    pin_system: bool = Field(False, description="keep the conversation's system prompt as attention sinks")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object (``code``: a short machine-readable string, or None)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
