"""OpenAI's wire format, without a model: the engine's events become the exact JSON OpenAI sends
(field order, nulls, fields left out), whole and streamed, for chat and text completions."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from streamingllm import __version__  # noqa: E402
from streamingllm.serve.jobs import Failed, Finished, SessionReport, TokenLogprob, TokenText  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from streamingllm.checks import ArgumentError  # noqa: E402
from streamingllm.sampling import Sampling  # noqa: E402
from streamingllm.serve.protocol import (LOCAL_SAMPLING, SAMPLING_FIELDS, ChatCompletionRequest,  # noqa: E402
                                         CompletionRequest, RequestDefaults)
from streamingllm.serve.serving import ChatReply, CompletionReply, JobEvents, _stream  # noqa: E402

FP = f"streamingllm-{__version__}"
SESSION = SessionReport("sess-x", "continued", None, 50, 48, 64, 0)
TOKENS = [TokenText("Hé", TokenLogprob("Hé", -0.5, (("Hé", -0.5), ("He", -1.5)))),
          TokenText("", TokenLogprob(" ", -0.25, ((" ", -0.25),))),  # held back: a stop string may start
          TokenText(" ")]  # the held-back text, shown when the reply ends
DONE = Finished("cancelled", 10, 4, 2, SESSION)
USAGE = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "prompt_tokens_details": {"cached_tokens": 4}}
SESSION_JSON = {"id": "sess-x", "status": "continued", "evicted": None, "seen_tokens": 50, "cached_tokens": 48,
                "max_cached_tokens": 64, "pinned_tokens": 0}
HE = {"token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169]}
SPACE = {"token": " ", "logprob": -0.25, "bytes": [32]}


def _reply(cls, logprobs=True):
    reply = cls("m", logprobs)
    reply.id, reply.created = "x", 7
    return reply


def _head(obj):
    return {"id": "x", "object": obj, "created": 7, "model": "m", "system_fingerprint": FP}


def _json(model) -> str:
    return json.dumps(model.model_dump(), ensure_ascii=False)


def test_a_whole_chat_completion():
    reply = _reply(ChatReply)
    for t in TOKENS:
        reply.add(t)
    expected = {**_head("chat.completion"), "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "Hé "},
        "logprobs": {"content": [{**HE, "top_logprobs": [HE, {"token": "He", "logprob": -1.5, "bytes": [72, 101]}]},
                                 {**SPACE, "top_logprobs": [SPACE]}]},
        "finish_reason": "length"}], "usage": USAGE, "session": SESSION_JSON}
    assert _json(reply.whole(DONE)) == json.dumps(expected, ensure_ascii=False)
    plain = _reply(ChatReply, logprobs=False)
    plain.add(TokenText("Hi"))
    body = plain.whole(Finished("stop", 3, 0, 1)).model_dump()
    assert list(body) == ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]
    assert body["choices"][0]["logprobs"] is None and body["choices"][0]["finish_reason"] == "stop"


def test_chat_chunks():
    reply = _reply(ChatReply)
    chunks = [_json(c) for c in reply.opening()] + [_json(c) for t in TOKENS if (c := reply.chunk(t)) is not None]
    chunks += [_json(reply.finishing(DONE)), _json(reply.usage_chunk(DONE))]

    def chunk(delta, logprobs=None, finish=None, **extra):
        return json.dumps({**_head("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], **extra}, ensure_ascii=False)

    assert chunks == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hé"}, {"content": [{**HE, "top_logprobs": [HE, {"token": "He", "logprob": -1.5,
                                                                           "bytes": [72, 101]}]}]}),
        chunk({"content": ""}, {"content": [{**SPACE, "top_logprobs": [SPACE]}]}),
        chunk({"content": " "}),
        chunk({}, None, "length", session=SESSION_JSON),
        json.dumps({**_head("chat.completion.chunk"), "choices": [], "usage": USAGE}),
    ]


def test_text_completion_whole_and_chunks():
    reply = _reply(CompletionReply)
    for t in TOKENS:
        reply.add(t)
    lps = {"tokens": ["Hé", " "], "token_logprobs": [-0.5, -0.25], "top_logprobs": [{"Hé": -0.5, "He": -1.5},
                                                                                    {" ": -0.25}],
           "text_offset": [0, 2]}
    done = Finished("length", 10, 0, 2)
    expected = {**_head("text_completion"), "choices": [{"index": 0, "text": "Hé ", "logprobs": lps,
                                                         "finish_reason": "length"}],
                "usage": {**USAGE, "prompt_tokens_details": {"cached_tokens": 0}}}
    assert _json(reply.whole(done)) == json.dumps(expected, ensure_ascii=False)
    stream = _reply(CompletionReply)
    assert stream.opening() == []
    chunks = [c.model_dump() for t in TOKENS if (c := stream.chunk(t)) is not None]
    chunks.append(stream.finishing(done).model_dump())
    assert [c["choices"][0]["text"] for c in chunks] == ["Hé", "", " ", ""]
    assert [c["choices"][0]["logprobs"] and c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [
        [0], [2], None, None]
    assert all(list(c) == ["id", "object", "created", "model", "system_fingerprint", "choices"] for c in chunks)


def test_a_failure_mid_stream_is_an_error_event_then_done():
    class Request:
        async def is_disconnected(self):
            return False

    async def run():
        events = JobEvents(Request())
        events.queue.put_nowait(Failed(500, "internal error: boom", "server_error"))
        out = [piece async for piece in _stream(events, TOKENS[0], _reply(ChatReply, logprobs=False), True)]
        return out, events.cancelled.is_set()

    out, cancelled = asyncio.run(run())
    error = {"error": {"message": "internal error: boom", "type": "server_error", "param": None, "code": 500}}
    assert out[-2:] == [f"data: {json.dumps(error)}\n\n", "data: [DONE]\n\n"] and len(out) == 4 and cancelled


def test_requests_translate_themselves():
    parts = [{"type": "text", "text": "Be"}, {"type": "text", "text": " kind"}]
    chat = ChatCompletionRequest(model="m", messages=[{"role": "developer", "content": parts},
                                                      {"role": "user", "content": "Hi"}],
                                 temperature=0.0005, stop="END", logprobs=True, max_completion_tokens=9, min_tokens=2)
    g = chat.to_generation(RequestDefaults(Sampling(penalty_last_n=32), max_tokens=100))
    assert g.messages == [{"role": "system", "content": "Be kind"}, {"role": "user", "content": "Hi"}]
    assert (g.prompt, g.max_tokens, g.min_tokens, g.stop, g.top_logprobs) == (None, 9, 2, ("END",), 0)
    assert g.sampling.temperature == 0.0 and g.sampling.penalty_last_n == 32  # below 1e-3: greedy
    text = CompletionRequest(model="m", prompt=["Once"], logprobs=3, seed=4).to_generation(
        RequestDefaults(max_tokens=100))
    assert (text.messages, text.prompt, text.max_tokens, text.top_logprobs) == (None, "Once", 100, 3)
    assert text.sampling.seed == 4
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}]).to_generation(
        RequestDefaults(max_tokens=100)).top_logprobs is None


HI = [{"role": "user", "content": "Hi"}]
SERVER = RequestDefaults(Sampling(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1,
                                  presence_penalty=0.5, frequency_penalty=0.25, penalty_last_n=48), 16, 100)


def test_unset_sampling_takes_the_servers_defaults_and_a_set_value_is_exact():
    assert set(SAMPLING_FIELDS) <= {f for f in Sampling.__dataclass_fields__}
    unset = ChatCompletionRequest(model="m", messages=HI, seed=5).to_generation(SERVER)
    assert unset.sampling == Sampling(**{**SERVER.sampling.__dict__, "seed": 5}) and unset.max_tokens == 16
    nulls = ChatCompletionRequest(model="m", messages=HI, **dict.fromkeys(SAMPLING_FIELDS)).to_generation(SERVER)
    assert nulls.sampling == SERVER.sampling  # null is unset, as OpenAI reads it
    off = dict(temperature=0, top_k=0, top_p=1, min_p=0, repetition_penalty=1, presence_penalty=0, frequency_penalty=0)
    for cls, what in ((ChatCompletionRequest, {"messages": HI}), (CompletionRequest, {"prompt": "Once"})):
        exact = cls(model="m", **what, **off).to_generation(SERVER).sampling
        assert exact == Sampling(penalty_last_n=48)  # each value as given, even the ones that turn a filter off
        one = cls(model="m", **what, temperature=1.3).to_generation(SERVER).sampling
        assert one == Sampling(**{**SERVER.sampling.__dict__, "temperature": 1.3})
    assert ChatCompletionRequest(model="m", messages=HI).to_generation().sampling == LOCAL_SAMPLING
    assert (LOCAL_SAMPLING.temperature, LOCAL_SAMPLING.top_k, LOCAL_SAMPLING.top_p, LOCAL_SAMPLING.min_p,
            LOCAL_SAMPLING.repetition_penalty, LOCAL_SAMPLING.penalty_last_n) == (0.8, 40, 0.95, 0.05, 1.1, 64)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "min_tokens"])
def test_a_request_beyond_the_servers_max_tokens_limit_is_refused_naming_the_field(field):
    ChatCompletionRequest(model="m", messages=HI, **{field: 100}).to_generation(SERVER)  # the limit itself is fine
    with pytest.raises(ArgumentError, match=f"^{field} must be <= 100, this server's limit") as info:
        ChatCompletionRequest(model="m", messages=HI, **{field: 101}).to_generation(SERVER)
    assert info.value.param == field


@pytest.mark.parametrize("body, param", [
    ({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"), ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 5.0}, "max_tokens"), ({"temperature": "0.5"}, "temperature"), ({"logprobs": "true"}, "logprobs"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options"), ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"), ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages"),
    ({"stop": ["ok", "\ud83d"]}, "stop")])
def test_fields_are_typed_strictly_and_text_must_be_unicode(body, param):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(**{"model": "m", "messages": HI, **body})
    error = info.value.errors()[0]
    assert error["loc"][0] == param
    error["msg"].encode("utf-8")  # the message itself holds no lone surrogate (it could not be sent)
    with pytest.raises(ValidationError, match="prompt must be valid Unicode: a lone surrogate"):
        CompletionRequest(model="m", prompt="x\udc00")
    ChatCompletionRequest(model="m", messages=HI, seed=-(2**63), temperature=1, stream=False)  # ints are numbers
