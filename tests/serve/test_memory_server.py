"""``streamingllm serve --memory --evict turns``: sessions with a memory of evicted blocks that evict
whole exchanges, through the openai client, restored exactly after a restart."""

from __future__ import annotations

import pytest

from serving import MODEL, running_server

pytestmark = pytest.mark.slow
pytest.importorskip("openai")

SYSTEM = "You are a helpful assistant. Answer in one short sentence."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("state"), "--window-size", "124", "--memory", "--evict", "turns",
                              "--block-size", "16", "--memory-blocks", "2", "--lookup-chunk", "16", "--max-tokens", "24")


def _ask(server, conv, sid):
    r = server.client().chat.completions.create(model=MODEL, messages=conv, temperature=0, max_tokens=24,
                                                extra_body={"session_id": sid})
    conv.append({"role": "assistant", "content": r.choices[0].message.content})
    return r


def test_a_long_conversation_evicts_whole_turns_into_the_memory(server):
    sid = server.new_session(pin_system=True)
    conv = [{"role": "system", "content": SYSTEM}]
    statuses = []
    for i in range(10):
        conv.append({"role": "user", "content": f"Remember the number {100 + i}. What is {i} plus one?"})
        statuses.append(_ask(server, conv, sid).session["status"])
    info = server.http("GET", f"/v1/sessions/{sid}").json()
    assert statuses == ["new"] + ["continued"] * 9  # never rebuilt: whole turns went to the memory
    assert info["seen_tokens"] > 2 * info["max_cached_tokens"] // 3 and info["turns"] == 10
    assert info["cached_tokens"] <= info["max_cached_tokens"]
    # the session's state, its memory included, is committed each turn: it survives a restart
    server.restart()
    conv.append({"role": "user", "content": "Which numbers did I ask you to remember?"})
    r = _ask(server, conv, sid)
    assert r.session["status"] == "restored" and r.choices[0].message.content
    assert server.http("GET", f"/v1/sessions/{sid}").json()["turns"] == 11


def test_bad_memory_options_are_refused_before_the_model_loads():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "streamingllm.cli", "serve", "--memory", "--memory-blocks", "-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--memory-blocks must be an integer >= 0" in r.stderr
