"""The server through the stock ``openai`` client and raw HTTP, against a real uvicorn on loopback:
completions streamed and whole, sessions that feed only what is new, stay bounded, stay apart and
survive a restart exactly, and errors that are JSON with the right status while the server keeps serving."""

from __future__ import annotations

import json
import time

import pytest

from serving import API_KEY, MODEL, assert_overload_refused

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

QUESTION = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}]


def _chat(server, messages, sid=None, extra_body=None, **kw):
    extra = {**({"session_id": sid} if sid else {}), **(extra_body or {})}
    return server.client().chat.completions.create(model=MODEL, messages=messages, temperature=0, extra_body=extra,
                                                   **{"max_tokens": 24, **kw})


def _sse(response) -> list[str]:
    return [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]


def test_chat_whole_and_streamed_agree(server):
    whole = _chat(server, QUESTION)
    assert "Paris" in whole.choices[0].message.content and whole.choices[0].finish_reason == "stop"
    assert whole.object == "chat.completion" and whole.model == MODEL
    u = whole.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.prompt_tokens_details.cached_tokens == 0
    stream = _chat(server, QUESTION, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens
    raw = server.http("POST", "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "stream": True,
                                                            "max_tokens": 5, "temperature": 0})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = _sse(raw)
    assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_text_completions_with_logprobs(server):
    c = server.client()
    whole = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                 logprobs=3)
    choice = whole.choices[0]
    assert choice.text.startswith(" Paris") and choice.finish_reason == "length"
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 6 and lp.text_offset[0] == 0
    assert all(len(t) == 3 and max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True))
    assert streamed == choice.text
    chat = _chat(server, QUESTION, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content).strip() == chat.choices[0].message.content.strip()
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)


def test_models_health_metrics_and_page(server):
    assert [m.id for m in server.client().models.list()] == [MODEL]
    assert server.http("GET", "/health").json()["status"] == "ok"
    text = server.http("GET", "/metrics").text
    for name in ("streamingllm_generated_tokens_total", "streamingllm_sessions_resident", "streamingllm_cache_fill_ratio",
                 "streamingllm_time_to_first_token_seconds_bucket", "streamingllm_inter_token_latency_seconds_bucket",
                 "process_resident_memory_bytes"):
        assert name in text
    assert "<title>streamingllm chat</title>" in server.http("GET", "/").text


def test_unset_sampling_takes_the_servers_defaults_and_set_values_are_exact(server):
    """The stock client sends no temperature: the server's defaults (llama.cpp's, the default model
    recommending none) fill each unset field, shown in /health; a field a request sets is used
    exactly, temperature 0 included."""
    defaults = server.http("GET", "/health").json()["defaults"]
    assert defaults == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1,
                        "presence_penalty": 0.0, "frequency_penalty": 0.0, "penalty_last_n": 64, "max_tokens": 64,
                        "max_tokens_limit": 4096}
    client = server.client()

    def ask(seed: int = 3, **kw) -> str:
        r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, seed=seed, **kw)
        return r.choices[0].message.content

    unset = ask()
    assert unset == ask(temperature=0.8, top_p=0.95, extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    openai_defaults = dict(temperature=1.0, top_p=1.0, extra_body={"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0})
    assert unset != ask(**openai_defaults)  # set: exactly those, not the server's
    greedy = dict(temperature=0, extra_body={"repetition_penalty": 1.0})
    assert ask(**greedy) == ask(seed=4, **greedy) and ask() != ask(seed=4)  # greedy: the seed does not matter


def _filler(i: int, words: int = 330) -> str:
    """A user message of about ``words`` * 1.3 tokens, different every turn."""
    return f"Note {i}: " + " ".join(f"item{(i * 7 + k) % 97} is filed under shelf {k % 13}." for k in range(words // 6))


def test_a_long_session_feeds_only_what_is_new_and_stays_bounded(server):
    """25 turns, 10,000+ tokens: each turn feeds its own message only (so its cost does not grow with
    the conversation), the cache stays at its size, and the server's memory stays flat."""
    sid = server.new_session()
    messages = [{"role": "system", "content": "You are a filing assistant. Reply with OK."}]
    seen, fed, rss, times = 0, [], [], []
    for turn in range(25):
        messages.append({"role": "user", "content": _filler(turn)})
        t = time.perf_counter()
        r = _chat(server, messages, sid, max_tokens=4)
        times.append(time.perf_counter() - t)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        s = r.session
        assert s["status"] == ("new" if turn == 0 else "continued")
        assert r.usage.prompt_tokens_details.cached_tokens == seen  # all that came before is cached, not re-read
        fed.append(r.usage.prompt_tokens - seen)
        seen = s["seen_tokens"]
        assert s["cached_tokens"] <= s["max_cached_tokens"] == 128
        rss.append(server.metric("process_resident_memory_bytes"))
    assert seen > 10_000
    assert max(fed[1:]) < 1.1 * min(fed[1:]) and max(fed) < 700  # each turn: its own message, whatever came before
    assert max(rss[5:]) - rss[5] < 48 * 2**20, [round(x / 2**20) for x in rss]  # flat: no growth with the conversation
    print(f"turn seconds: first 5 {[round(x, 2) for x in times[:5]]}, last 5 {[round(x, 2) for x in times[-5:]]}")


def test_two_sessions_stay_apart(server):
    """Interleaved turns of two sessions give the logprobs each gets alone, and a session id cannot
    reach another conversation's cache."""
    a, b, alone = server.new_session(), server.new_session(), server.new_session()
    conv_a = [{"role": "user", "content": "My name is Alice and I like tea."}]
    conv_b = [{"role": "user", "content": "My name is Bob and I keep bees. Bees make honey in summer."}]
    got = {}
    for step in range(3):
        for sid, conv in ((a, conv_a), (b, conv_b)):
            r = _chat(server, conv, sid, max_tokens=8, logprobs=True, top_logprobs=3)
            got.setdefault(sid, []).append([t.logprob for t in r.choices[0].logprobs.content])
            conv += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": f"Tell me one more thing ({step})."}]
    conv = [{"role": "user", "content": "My name is Alice and I like tea."}]
    for step in range(3):
        r = _chat(server, conv, alone, max_tokens=8, logprobs=True, top_logprobs=3)
        assert [t.logprob for t in r.choices[0].logprobs.content] == pytest.approx(got[a][step], abs=1e-4)
        conv += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": f"Tell me one more thing ({step})."}]
    r = _chat(server, conv_a[:-1] + [{"role": "user", "content": "What is my name?"}], b)
    assert r.session["status"] == "rebuilt"  # b's cache was not continued with a's conversation
    assert server.http("GET", "/v1/sessions/sess-notasessionatall00000").status_code == 404


def test_an_edited_history_rebuilds_the_session(server):
    sid = server.new_session()
    conv = list(QUESTION)
    r = _chat(server, conv, sid)
    conv += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "And Italy?"}]
    assert _chat(server, conv, sid).session["status"] == "continued"
    edited = [conv[0], {"role": "user", "content": "What is the capital of Spain?"}]
    r = _chat(server, edited, sid)
    assert r.session["status"] == "rebuilt" and r.usage.prompt_tokens_details.cached_tokens == 0
    assert "Madrid" in r.choices[0].message.content


def test_a_restart_restores_a_session_exactly(server):
    """Two sessions hold the same turn; one answers the next question before a restart, the other
    (restored from the state directory) after it: the same next-token logprobs."""
    a, b = server.new_session(pin_system=True), server.new_session(pin_system=True)
    conv = list(QUESTION)
    for sid in (a, b):
        first = _chat(server, conv, sid)
    nxt = conv + [{"role": "assistant", "content": first.choices[0].message.content},
                  {"role": "user", "content": "And what is the capital of Germany?"}]
    before = _chat(server, nxt, a, logprobs=True, top_logprobs=5, max_tokens=6)
    server.restart()
    after = _chat(server, nxt, b, logprobs=True, top_logprobs=5, max_tokens=6)
    assert after.session["status"] == "restored" and after.session["pinned_tokens"] > 0
    assert after.choices[0].message.content == before.choices[0].message.content
    for x, y in zip(before.choices[0].logprobs.content, after.choices[0].logprobs.content):
        assert [t.logprob for t in x.top_logprobs] == pytest.approx([t.logprob for t in y.top_logprobs], abs=1e-5)


def test_errors_are_json_with_their_status_and_the_server_keeps_serving(server):
    def error(r, status):
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert body["message"] and body["type"]
        return body

    post = lambda **kw: server.http("POST", "/v1/chat/completions", **kw)  # noqa: E731
    assert "JSON" in error(post(content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}),
                           400)["message"]
    assert "temperature" in error(post(json={"model": MODEL, "messages": QUESTION, "temperature": "hot"}), 400)["message"]
    error(post(json={"model": MODEL, "messages": "hello"}), 400)
    error(post(json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]}),
          400)
    error(post(json={"model": MODEL, "messages": QUESTION, "n": 3}), 400)
    assert "does not exist" in error(post(json={"model": "gpt-9", "messages": QUESTION}), 404)["message"]
    error(post(json={"model": MODEL, "messages": QUESTION, "session_id": "sess-unknown-but-well-formed-1"}), 404)
    huge = [{"role": "user", "content": "word " * 5000}]  # > --max-prompt-tokens 3000
    assert "max-prompt-tokens" in error(post(json={"model": MODEL, "messages": huge}), 413)["message"]
    error(post(json={"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}), 413)  # > 1 MiB body
    r = httpx_post_without_key(server)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError):
        _chat(server, QUESTION, "sess-unknown-but-well-formed-2")
    assert "Paris" in _chat(server, QUESTION).choices[0].message.content  # still serving


def httpx_post_without_key(server):
    import httpx

    return httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})


def test_a_client_that_disconnects_mid_stream_cancels_its_reply(server):
    import httpx

    sid = server.new_session()
    story = [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}]
    name = 'streamingllm_requests_total{outcome="cancelled"}'
    cancelled = server.metric(name, 0.0)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": MODEL, "messages": story, "stream": True, "max_tokens": 60, "session_id": sid,
                            "min_tokens": 60, "temperature": 0}, timeout=60) as r:
        pieces = 0
        for line in r.iter_lines():
            pieces += line.startswith("data: ")
            if pieces >= 4:
                break  # the client goes away after a few tokens
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.metric(name, 0.0) == cancelled:
        time.sleep(0.2)
    assert server.metric(name, 0.0) == cancelled + 1
    info = server.http("GET", f"/v1/sessions/{sid}").json()
    assert info["turns"] == 1 and not info["busy"] and info["seen_tokens"] < 60 + 40  # stopped early, turn closed
    # The cache holds exactly the transcript the server reports, the reply's tokens fed once: it is
    # the cache of the same greedy reply cut by max_tokens at the same token. (A fresh session fed
    # the transcript's text is no reference: a cut reply's text can tokenize otherwise, " L" "ighth"
    # "ouse" read back as " Lighthouse".)
    one = _chat(server, story, server.new_session(), max_tokens=1, extra_body={"min_tokens": 1})
    n = info["seen_tokens"] - one.session["seen_tokens"] + 1  # the cancelled reply's tokens
    twin_sid = server.new_session()
    twin = _chat(server, story, twin_sid, max_tokens=n, extra_body={"min_tokens": n})
    assert twin.choices[0].finish_reason == "length" and twin.usage.completion_tokens == n
    assert twin.session["seen_tokens"] == info["seen_tokens"]
    assert [twin.choices[0].message.content] == [m["content"] for m in info["messages"] if m["role"] == "assistant"]
    conv = info["messages"] + [{"role": "user", "content": "Thanks. What is 2 + 2?"}]
    cont = _chat(server, conv, sid, max_tokens=5, logprobs=True)
    ref = _chat(server, conv, twin_sid, max_tokens=5, logprobs=True)
    assert cont.session["status"] == "continued" and ref.session["status"] == "continued"
    assert cont.usage.prompt_tokens == ref.usage.prompt_tokens
    assert [t.logprob for t in cont.choices[0].logprobs.content] == pytest.approx(
        [t.logprob for t in ref.choices[0].logprobs.content], abs=1e-3)


def test_overload_is_503_with_retry_after(server):
    """--max-batch 4 --max-queue 2: a seventh concurrent request is refused, the others are served."""
    assert_overload_refused(server, requests=10, served_at_least=6)
