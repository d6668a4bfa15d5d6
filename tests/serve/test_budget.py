"""The session budget, in process (starlette's TestClient over the real application): past
--max-sessions the least recently used session is evicted, saved to the state directory (and
restored exactly) or dropped (and rebuilt from the messages), and its next response says which."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

MODEL = "smollm2-135m"



def _client(smollm, **settings):
    from fastapi.testclient import TestClient

    from streamingllm.serve.server import ServerSettings, build_app

    app, engine = build_app(*smollm, MODEL, ServerSettings(window_size=60, max_sessions=1, **settings))
    return TestClient(app, base_url="http://127.0.0.1"), engine  # a Host the server answers to


def _ask(client, sid, messages):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0,
                                                  "max_tokens": 8, "session_id": sid, "logprobs": True,
                                                  "top_logprobs": 3})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("state_dir", [True, False])
def test_the_least_recently_used_session_is_evicted_and_says_so(smollm, tmp_path, state_dir):
    client, engine = _client(smollm, state_dir=str(tmp_path) if state_dir else None)
    try:
        a, b = (client.post("/v1/sessions", json={}).json()["id"] for _ in range(2))
        conv = [{"role": "user", "content": "What is the capital of France?"}]
        first = _ask(client, a, conv)
        _ask(client, b, conv)  # one session in memory at most: a is evicted
        assert client.get(f"/v1/sessions/{a}").json()["resident"] is False
        nxt = conv + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "And of Italy?"}]
        again = _ask(client, a, nxt)
        if state_dir:
            assert again["session"]["evicted"] == "saved" and again["session"]["status"] == "restored"
            assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == first["session"]["seen_tokens"]
        else:
            assert again["session"]["evicted"] == "dropped" and again["session"]["status"] == "new"
            assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # fed again, whole
        assert "Rome" in again["choices"][0]["message"]["content"]
        assert _ask(client, a, nxt + [{"role": "assistant", "content": again["choices"][0]["message"]["content"]},
                                      {"role": "user", "content": "Thanks."}])["session"]["evicted"] is None
        metrics = client.get("/metrics").text
        assert "streamingllm_sessions_resident 1.0" in metrics
    finally:
        engine.stop()


def test_a_restored_session_continues_as_if_never_evicted(smollm, tmp_path):
    """The same conversation in a session that stayed resident and in one that was evicted to the
    state directory and restored: equal next-token log-probabilities."""
    client, engine = _client(smollm, state_dir=str(tmp_path))
    try:
        conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
        a = client.post("/v1/sessions", json={}).json()["id"]
        first = _ask(client, a, conv)
        nxt = conv + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "Another one?"}]
        resident = _ask(client, a, nxt)  # a stayed in memory
        b = client.post("/v1/sessions", json={}).json()["id"]
        _ask(client, b, conv)
        c = client.post("/v1/sessions", json={}).json()["id"]
        _ask(client, c, conv)  # b is evicted (saved)
        restored = _ask(client, b, nxt)
        assert restored["session"]["status"] == "restored"
        for x, y in zip(resident["choices"][0]["logprobs"]["content"], restored["choices"][0]["logprobs"]["content"]):
            assert x["token"] == y["token"] and abs(x["logprob"] - y["logprob"]) <= 1e-5
    finally:
        engine.stop()
