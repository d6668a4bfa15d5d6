"""``streamingllm.client`` from Python against a real ``streamingllm serve`` (the shared server of
this folder: the default model on a 4 + 124 token cache per session, API key ``test-key``): a
remote conversation and a local :class:`~streamingllm.session.Session` answer alike through the
one :class:`~streamingllm.client.Conversation` interface; a stopped reply is settled with the
server's transcript; reset and close delete the server sessions; the server's refusals arrive as
:class:`~streamingllm.client.ServerError`."""

from __future__ import annotations

import io

import pytest

from serving import API_KEY, free_port
from streamingllm.checks import ArgumentError
from streamingllm.client import Conversation, RemoteSession, ServerError, ServerUnreachableError, server_url
from streamingllm.session import Session

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"


def test_a_remote_and_a_local_conversation_answer_alike(server, smollm):
    """The same model, cache (4 + 124 tokens), system prompt and greedy decoding, here and on the
    server: the same reply, transcript and cache numbers, read through the interface alone."""
    local = Session(*smollm, 4, 124, system=SYSTEM, max_new_tokens=20)
    with RemoteSession(server.url, API_KEY, system=SYSTEM, max_new_tokens=20) as remote:
        assert (remote.model, remote.sink_size, remote.window_size) == ("smollm2-135m", 4, 124)
        seen = []
        for chat in (local, remote):
            assert isinstance(chat, Conversation)
            assert chat.stats() == {"seen_tokens": 0, "cached_tokens": 0, "max_cached_tokens": 128,
                                    "pinned_tokens": 0, "turns": 0}
            reply = "".join(chat.reply(QUESTION))
            assert "Paris" in reply
            assert chat.messages == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
                                     {"role": "assistant", "content": reply}]
            seen.append((reply, chat.stats(), chat.stats(refresh=True)))
        assert seen[0] == seen[1], seen
        stats = seen[1][2]
        assert stats["turns"] == 1 and 0 < stats["cached_tokens"] == stats["seen_tokens"] <= 128
        on_server = server.http("GET", f"/v1/sessions/{remote.session_id}").json()
        assert on_server["messages"] == remote.messages and on_server["seen_tokens"] == stats["seen_tokens"]
    assert (local.interruptible, local.can_save) == (False, True)
    assert (remote.interruptible, remote.can_save) == (True, False)


def test_a_stopped_reply_is_settled_with_the_servers_transcript(server):
    """Closing a reply early cancels it on the server; the next reply first adopts the server's
    transcript of the stopped turn, so the server continues the session instead of rebuilding it."""
    with RemoteSession(server.url, API_KEY, max_new_tokens=60) as remote:
        reply = remote.reply("Tell me a long story about a lighthouse keeper.")
        shown = next(reply) + next(reply) + next(reply)
        reply.close()
        assert remote.messages[-1] == {"role": "assistant", "content": shown}
        # the server may generate a piece more than was shown before it sees the connection close; as if it had:
        remote.messages[-1]["content"] = shown[: len(shown) // 2]
        answer = "".join(remote.reply(QUESTION))
        assert "Paris" in answer and remote.info["status"] == "continued", remote.info
        stopped = remote.messages[1]["content"]
        assert stopped.startswith(shown)  # the server's text of the stopped turn: what was shown, a token or two more
        assert remote.stats(refresh=True)["turns"] == 2
        assert server.http("GET", f"/v1/sessions/{remote.session_id}").json()["messages"] == remote.messages


def test_reset_and_close_delete_the_server_sessions(server):
    remote = RemoteSession(server.url, API_KEY, system=SYSTEM, max_new_tokens=5)
    first = remote.session_id
    assert server.http("GET", f"/v1/sessions/{first}").status_code == 200
    "".join(remote.reply("Hi"))
    remote.reset()
    assert remote.session_id != first and remote.messages == [{"role": "system", "content": SYSTEM}]
    assert remote.stats()["turns"] == 0 and remote.stats()["seen_tokens"] == 0
    assert server.http("GET", f"/v1/sessions/{first}").status_code == 404
    second = remote.session_id
    remote.close()
    assert remote.session_id is None and server.http("GET", f"/v1/sessions/{second}").status_code == 404


def test_a_kept_session_is_continued_by_its_id(server):
    """keep() leaves the session on the server; session_id adopts its transcript, system prompt and
    pinning, and the next reply continues it (the server feeds only the new turn)."""
    with RemoteSession(server.url, API_KEY, system=SYSTEM, pin_system=True, max_new_tokens=20) as first:
        "".join(first.reply(QUESTION))
        first.keep()
        sid, transcript = first.session_id, list(first.messages)
    assert first.session_id is None and server.http("GET", f"/v1/sessions/{sid}").status_code == 200
    with RemoteSession(server.url, API_KEY, session_id=sid, max_new_tokens=20) as again:
        assert (again.session_id, again.messages, again.system, again.pin_system) == (sid, transcript, SYSTEM, True)
        assert again.stats()["turns"] == 1 and again.stats()["seen_tokens"] > 0
        "".join(again.reply("And of Italy?"))
        assert again.info["status"] == "continued", again.info
        assert again.stats(refresh=True)["turns"] == 2
    assert server.http("GET", f"/v1/sessions/{sid}").status_code == 404  # not kept this time: deleted
    with pytest.raises(ServerError) as info:
        RemoteSession(server.url, API_KEY, session_id="no-such-session")
    assert info.value.status == 404


def test_refusals_and_failures_are_typed_and_leave_the_conversation_as_it_was(server):
    with pytest.raises(ServerError) as info:
        RemoteSession(server.url, "wrong-key")
    assert info.value.status == 401 and "answered 401 to GET /v1/models" in str(info.value)
    with RemoteSession(server.url, API_KEY, stop=[f"STOP{i}" for i in range(5)]) as remote:  # the server takes 4
        with pytest.raises(ServerError) as info:
            "".join(remote.reply("Hi"))
        assert info.value.status == 400 and "stop" in str(info.value)
        assert remote.messages == [] and remote.stats()["turns"] == 0
        with pytest.raises(ArgumentError, match="user_text must be a non-empty message"):
            "".join(remote.reply("  "))
        for method in (remote.save, remote.load):
            with pytest.raises(io.UnsupportedOperation, match="the cache is on the server"):
                method("chat.pt")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there once the probe socket is closed
    with pytest.raises(ServerUnreachableError, match=f"cannot reach the server at {url}: "):
        RemoteSession(url)


def test_server_urls():
    assert server_url(" http://127.0.0.1:8000/v1/ ") == "http://127.0.0.1:8000"
    assert server_url("https://example.org/chat") == "https://example.org/chat"
    for bad in ("127.0.0.1:8000", "ftp://example.org", "http://", None):
        with pytest.raises(ArgumentError, match="url must be an http:// or https:// URL") as info:
            server_url(bad)
        assert info.value.param == "url"
