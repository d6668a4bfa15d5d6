"""What a hostile client tries against a real ``streamingllm serve`` (issue 23, points 9-18): every
case checks its own answer, then that the server still serves (:func:`still_serves`).

One server subprocess for the module (``hostile``, small limits so each bound is reachable fast);
cases that must restart or corrupt the state dir start a server of their own.
"""

from __future__ import annotations

import pytest

from serving import Server

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The default model on a 4 + 60 cache; small limits (body, batch, queue, tokens, sessions)."""
    from streamingllm.models import ModelLoadError, default_gguf_path

    try:
        default_gguf_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    srv = Server(tmp_path_factory.mktemp("hostile"), "--window-size", "60", "--max-prompt-tokens", "2000",
                 "--max-body-mib", "1", "--max-batch", "2", "--max-queue", "1", "--max-tokens", "16")
    srv.start()
    yield srv
    srv.stop()


def still_serves(srv: Server) -> None:
    """The server answers a small whole request correctly after a hostile case."""
    r = srv.http("POST", "/v1/chat/completions",
                 json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                       "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


# --- request path: disconnects, body limits, admission, internal errors, logs (points 9, 11, 12, 14, 18) ---


# --- request fields: ceilings and strict validation (points 10, 13) -------------------------------------


# --- sessions and the state dir: robustness, expiry, bounds (points 15, 16) -----------------------------


# --- browser-facing hardening (point 17) ----------------------------------------------------------------
