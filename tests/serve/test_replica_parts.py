"""The replicated server's parts that need no cluster: finding a request's session, the routing key,
one ASGI call in-process, the metrics of several replicas as one, and the application builder."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve")

from streamingllm.checks import ArgumentError  # noqa: E402
from streamingllm.serve.metrics import label_samples  # noqa: E402
from streamingllm.serve.replicas import application, call_asgi, request_session  # noqa: E402
from streamingllm.serve.routing import routing_key  # noqa: E402
from streamingllm.serve.state_dir import ID_PATTERN  # noqa: E402


def test_a_request_names_its_session_where_the_single_process_server_reads_it():
    sid = "sess-" + "a" * 24
    new, is_new = request_session("POST", "/v1/sessions", {}, b"{}")
    assert is_new and ID_PATTERN.match(new) and new != request_session("POST", "/v1/sessions", {}, b"")[0]
    assert request_session("GET", f"/v1/sessions/{sid}", {}, b"") == (sid, False)
    assert request_session("DELETE", f"/v1/sessions/{sid}", {}, b"") == (sid, False)
    body = b'{"model": "m", "session_id": "%s", "messages": []}' % sid.encode()
    assert request_session("POST", "/v1/chat/completions", {}, body) == (sid, False)
    assert request_session("POST", "/v1/chat/completions", {"x-session-id": sid}, b"{}") == (sid, False)
    assert request_session("POST", "/v1/chat/completions", {"x-session-id": sid}, b"not json") == (sid, False)
    assert request_session("POST", "/v1/chat/completions", {}, b'{"session_id": 3}') == (None, False)
    assert request_session("GET", "/health", {}, b"") == (None, False)


def test_the_routing_key_is_stable_and_does_not_carry_the_id():
    sid = "sess-" + "b" * 24
    assert routing_key(sid) == routing_key(sid) != routing_key(sid[:-1] + "c")
    assert len(routing_key(sid)) == 32 and "sess" not in routing_key(sid)


def test_one_asgi_call_streams_and_tells_the_application_its_caller_left():
    seen = {}

    async def app(scope, receive, send):
        seen["state"] = scope["state"]
        body = await receive()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body["body"].upper(), "more_body": True})
        seen["next"] = await receive()  # blocks until the caller goes away
        seen["done"] = True

    async def run():
        parts = call_asgi(app, "POST", "/x", "", [("Host", "h")], b"hello", {"assigned_session_id": "s"})
        first = await parts.__anext__()
        second = await parts.__anext__()
        await parts.aclose()  # the caller stops reading: the application sees http.disconnect
        return first, second

    first, second = asyncio.run(run())
    assert first["status"] == 201 and second["body"] == b"HELLO"
    assert seen["next"] == {"type": "http.disconnect"} and seen["done"]
    assert seen["state"] == {"assigned_session_id": "s"}


def test_several_replicas_metrics_are_one_exposition_with_a_label():
    text = ("# HELP a_total A.\n# TYPE a_total counter\na_total 3.0\n"
            "# HELP b B.\n# TYPE b gauge\nb{kind=\"x\"} 1.0\n")
    merged = label_samples({"r1": text, "r2": text}, "replica")
    lines = merged.splitlines()
    assert lines.count("# HELP a_total A.") == 1 and lines.count("# TYPE b gauge") == 1
    assert 'a_total{replica="r1"} 3.0' in lines and 'b{kind="x",replica="r2"} 1.0' in lines
    # each metric's samples follow its own header
    assert lines.index('a_total{replica="r2"} 3.0') < lines.index("# HELP b B.")


def test_the_application_builder_takes_serves_options_and_refuses_a_shared_state_dir():
    app = application({"replicas": 2, "session_store": "redis://127.0.0.1:1/0", "window_size": 124,
                       "lease_ttl": 5})
    assert type(app).__name__ == "Application"
    with pytest.raises(ArgumentError, match="redis://"):
        application({"replicas": 2, "state_dir": "/tmp/nowhere"})
    with pytest.raises(ArgumentError, match="window"):
        application({"window_size": 0})
