"""The engine without HTTP (default model): a request chooses, token for token, what
generate_tokens and a Session choose for the same seed and settings, and reports typed events."""

from __future__ import annotations

import queue

import pytest

from streamingllm import Sampling, SinkCache, generate_tokens
from streamingllm.session import Session

pytestmark = pytest.mark.slow

SAMPLED = Sampling(temperature=0.9, top_k=50, top_p=0.95, seed=5, repetition_penalty=1.2, presence_penalty=0.3,
                   frequency_penalty=0.2, penalty_last_n=16)


@pytest.fixture(scope="module")
def engine(smollm):
    from streamingllm.serve.engine import Engine
    from streamingllm.serve.sessions import SessionStore

    ref = {}
    store = SessionStore(lambda system, pin: ref["engine"].new_session(system, pin))
    ref["engine"] = engine = Engine(*smollm, 4, 60, store, max_prompt_tokens=200, compile="off")
    engine.start()
    yield engine
    engine.stop()


def _run(engine, request) -> list:
    """The events of one job, up to its Finished (or Failed)."""
    from streamingllm.serve.jobs import Failed, Finished, Job

    events: queue.Queue = queue.Queue()
    engine.submit(Job(request, events.put))
    out = []
    while not out or not isinstance(out[-1], (Finished, Failed)):
        out.append(events.get(timeout=300))
    return out


def test_a_completion_chooses_what_generate_tokens_chooses(smollm, engine):
    """Sampled with every penalty, past the 64-token cache: the same tokens, one TokenText each,
    then Finished with the counts."""
    from streamingllm.serve.jobs import Finished, GenerationRequest, TokenText

    model, tokenizer = smollm
    prompt = "Once upon a time, in a small village by the sea,"
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    expected = [int(t[0]) for t in generate_tokens(model, SinkCache(model, 4, 60), ids, 40, SAMPLED, compile="off")]
    events = _run(engine, GenerationRequest(None, prompt, SAMPLED, max_tokens=40, top_logprobs=0))
    tokens, done = events[:-1], events[-1]
    assert all(isinstance(e, TokenText) and e.logprob is not None for e in tokens)
    assert [e.logprob.token for e in tokens] == [tokenizer.decode([t]) for t in expected]
    assert "".join(e.text for e in tokens) == tokenizer.decode(expected, skip_special_tokens=True)
    assert isinstance(done, Finished) and done.reason == "length" and done.session is None
    assert (done.prompt_tokens, done.cached_tokens, done.completion_tokens) == (len(ids), 0, 40)
    greedy = _run(engine, GenerationRequest(None, prompt, Sampling(), max_tokens=40))
    assert "".join(e.text for e in greedy[:-1]) != "".join(e.text for e in tokens)  # the settings matter


def test_a_chat_replies_what_a_session_replies(smollm, engine):
    """The same reply as Session.reply, with a minimum length and a stop string."""
    from streamingllm.serve.jobs import Finished, GenerationRequest

    model, tokenizer = smollm
    question = "Tell me about the sea."
    session = Session(model, tokenizer, 4, 60, sampling=SAMPLED, max_new_tokens=30, min_new_tokens=8, stop=["whale"],
                      compile="off")
    expected = "".join(session.reply(question))
    events = _run(engine, GenerationRequest([{"role": "user", "content": question}], None, SAMPLED, max_tokens=30,
                                            min_tokens=8, stop=("whale",)))
    assert "".join(e.text for e in events[:-1]) == expected and expected
    assert isinstance(events[-1], Finished) and events[-1].reason in ("stop", "length")


def test_a_refused_request_fails_with_its_status(engine):
    from streamingllm.serve.jobs import Failed, GenerationRequest

    (failed,) = _run(engine, GenerationRequest(None, "word " * 300, Sampling(), max_tokens=4))
    assert isinstance(failed, Failed) and failed.status == 413 and "max-prompt-tokens" in failed.message
