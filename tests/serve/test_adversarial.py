"""What a hostile client tries against a real ``streamingllm serve`` (issue 23, points 9-18): every
case checks its own answer, then that the server still serves (:func:`still_serves`).

One server subprocess for the module (``hostile``, small limits so each bound is reachable fast);
cases that must restart or corrupt the state dir start a server of their own.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time

import pytest

from serving import API_KEY, Server, running_server

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The default model on a 4 + 60 cache; small limits (body, batch, queue, tokens, sessions)."""
    yield from running_server(tmp_path_factory.mktemp("hostile"), "--window-size", "60", "--max-prompt-tokens", "2000",
                              "--max-body-mib", "1", "--max-batch", "2", "--max-queue", "1", "--max-tokens", "16")


def still_serves(srv: Server) -> None:
    """The server answers a small whole request correctly after a hostile case."""
    r = srv.http("POST", "/v1/chat/completions",
                 json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                       "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


# --- request path: disconnects, body limits, admission, internal errors, logs (points 9, 11, 12, 14, 18) ---


def _chat(**fields) -> dict:
    return {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], **fields}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_an_abandoned_whole_request_frees_its_session(hostile):
    """A client that gives up on a whole (non-streamed) request: the job is cancelled within about
    a second (a 2,000-token reply would hold the session for minutes), so the session serves again."""
    httpx = pytest.importorskip("httpx")
    sid = hostile.new_session()
    with pytest.raises(httpx.TimeoutException):  # the client hangs up after 1.5 s
        httpx.post(f"{hostile.url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=1.5, json=_chat(max_tokens=2000, min_tokens=2000, session_id=sid))
    deadline = time.monotonic() + 15  # the cancel needs ~0.5 s and one iteration (seconds on a loaded machine)
    while hostile.http("GET", f"/v1/sessions/{sid}").json()["busy"]:
        assert time.monotonic() < deadline, "the abandoned request still holds its session"
        time.sleep(0.1)
    r = hostile.http("POST", "/v1/chat/completions", json=_chat(max_tokens=2, session_id=sid))
    assert r.status_code == 200, r.text  # not 409
    still_serves(hostile)


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams_in(hostile):
    """A chunked body has no Content-Length: its bytes are counted as they arrive, and the 413
    (connection closed) comes after about --max-body-mib (1 MiB), long before the 50 MiB are sent."""
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=30) as s:
        rss = _rss_mib(hostile.proc.pid)
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{hostile.port}\r\n"
                  f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        piece = b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "' + b"word " * 13000
        sent, started = 0, time.monotonic()
        try:
            while sent < 50 << 20 and not select.select([s], [], [], 0)[0]:  # until the server answers
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        except OSError:  # the server closed the connection while this was sending: as good
            pass
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 24 << 20, f"{sent >> 20} MiB were sent before the 413"  # 1 MiB + the sockets' buffers
    assert time.monotonic() - started < 30
    assert _rss_mib(hostile.proc.pid) - rss < 200
    still_serves(hostile)


def test_the_queue_bound_is_exact_under_simultaneous_requests(hostile):
    """--max-batch 2 --max-queue 1: of 8 simultaneous requests exactly 3 are taken, 5 get 503 (the
    request being admitted counts too)."""
    httpx = pytest.importorskip("httpx")
    n = 8
    barrier, codes = threading.Barrier(n), [None] * n

    def ask(i: int) -> None:
        body = _chat(messages=[{"role": "user", "content": "Count to fifty. " * 20}], max_tokens=8, min_tokens=8)
        with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            barrier.wait()
            codes[i] = client.post(f"{hostile.url}/v1/chat/completions", json=body).status_code

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(codes) == [200] * 3 + [503] * 5
    still_serves(hostile)


def test_a_500_names_an_id_and_only_the_log_has_the_details(hostile):
    """A turn whose save fails (its metadata's temporary file is a directory): the client gets a
    500 naming an id, without the exception or any path; the log has the traceback under that id,
    with the session id redacted."""
    sid = hostile.new_session()
    blocker = hostile.state_dir / f"{sid}.json.tmp"
    blocker.mkdir()
    try:
        r = hostile.http("POST", "/v1/chat/completions", json=_chat(max_tokens=2, session_id=sid))
    finally:
        blocker.rmdir()
    assert r.status_code == 500, r.text
    message = r.json()["error"]["message"]
    eid = re.search(r"err-[0-9a-f]{12}", message).group()
    for secret in ("Error", str(hostile.state_dir), sid, ".json", "/"):
        assert secret not in message, message
    hostile.log.flush()
    log = (hostile.state_dir / "server.log").read_text()
    details = log[log.index(eid):][:3000]
    assert "IsADirectoryError" in details and sid not in details and "sess-#" in details
    still_serves(hostile)


def test_session_ids_are_redacted_in_the_access_log(caplog):
    """uvicorn's access log line for /v1/sessions/{id} (as uvicorn logs it) shows a fingerprint,
    not the id, once the application is built (:func:`~streamingllm.serve.logs.install_redaction`)."""
    import logging

    from streamingllm.serve.logs import install_redaction, redact

    install_redaction()
    sid = "sess-" + "A1b2_C3d4-" * 3
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                                                 f"/v1/sessions/{sid}?x={sid}", "1.1", 200)
    line = caplog.records[-1].getMessage()
    assert sid not in line and line.count(redact(sid)) == 2 and redact(sid) != redact(sid + "x")


# --- request fields: ceilings and strict validation (points 10, 13) -------------------------------------


def _refused(r, status: int, param: str) -> dict:
    """The error object of ``r``, checked: its status, the field it names (``messages.0.content``
    names ``messages``), and a short reply."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["param"] or "").split(".")[0] == param, error
    assert len(r.content) < 2000, len(r.content)  # nothing the client sent is echoed back whole
    return error


def test_max_tokens_and_min_tokens_are_bounded_by_the_server(hostile):
    """--max-tokens (16 here) is only a default; --max-tokens-limit (4096 by default) bounds what a
    request may ask for, and a request beyond it gets 400 naming the field."""
    defaults = hostile.http("GET", "/health").json()["defaults"]
    assert (defaults["max_tokens"], defaults["max_tokens_limit"]) == (16, 4096)
    for field in ("min_tokens", "max_completion_tokens", "max_tokens"):
        r = hostile.http("POST", "/v1/chat/completions", json={
            "model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
            "max_tokens": 2, field: 4097})
        assert "--max-tokens-limit" in _refused(r, 400, field)["message"]
        still_serves(hostile)
    r = hostile.http("POST", "/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 10**6})
    _refused(r, 400, "max_tokens")
    still_serves(hostile)


def test_bad_fields_get_400_naming_them(hostile):
    """Wrong types are refused as OpenAI's schema types them (no "yes" for true), a lone UTF-16
    surrogate is refused before the tokenizer sees it, a seed beyond int64 names ``seed``, and an
    empty or overlong session id names ``session_id`` without being echoed back."""
    import json

    hi = [{"role": "user", "content": "Hi"}]
    cases = [  # (path, body, headers, the field named)
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi \ud800 there"}]}, {}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
         {}, "messages"),
        ("/v1/completions", {"prompt": "Once \udc00"}, {}, "prompt"),
        ("/v1/chat/completions", {"messages": hi, "stop": ["\ud83d"]}, {}, "stop"),
        ("/v1/chat/completions", {"messages": hi, "seed": 2**64}, {}, "seed"),
        ("/v1/chat/completions", {"messages": hi, "stream": "yes"}, {}, "stream"),
        ("/v1/chat/completions", {"messages": hi, "max_tokens": "5"}, {}, "max_tokens"),
        ("/v1/chat/completions", {"messages": hi, "logprobs": 1}, {}, "logprobs"),
        ("/v1/chat/completions", {"messages": hi, "session_id": ""}, {}, "session_id"),
        ("/v1/chat/completions", {"messages": hi}, {"X-Session-Id": ""}, "session_id"),
        ("/v1/chat/completions", {"messages": hi, "session_id": "sess-" + "x" * 500_000}, {}, "session_id"),
    ]
    for path, body, headers, param in cases:
        raw = json.dumps({"model": "smollm2-135m", "max_tokens": 2, **body}).encode()  # surrogates as \\u escapes
        r = hostile.http("POST", path, content=raw, headers={"content-type": "application/json", **headers})
        _refused(r, 400, param)
        still_serves(hostile)
    for method in ("GET", "DELETE"):
        _refused(hostile.http(method, "/v1/sessions/sess-" + "y" * 5000), 400, "session_id")
    still_serves(hostile)


def test_both_413s_have_one_error_type(hostile):
    """A body over --max-body-mib and a prompt over --max-prompt-tokens: the same status and type."""
    big_body = hostile.http("POST", "/v1/chat/completions", json={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    long_prompt = hostile.http("POST", "/v1/chat/completions", json={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 2})
    assert big_body.status_code == long_prompt.status_code == 413, (big_body.text, long_prompt.text)
    assert big_body.json()["error"]["type"] == long_prompt.json()["error"]["type"] == "request_too_large"
    still_serves(hostile)


# --- sessions and the state dir: robustness, expiry, bounds (points 15, 16) -----------------------------


def _session_turn(srv: Server, sid: str, messages: list[dict]) -> dict:
    r = srv.http("POST", "/v1/chat/completions", json={"model": "smollm2-135m", "messages": messages, "session_id": sid,
                                                       "temperature": 0, "max_tokens": 8})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_state_dir_survives_a_crash_corrupt_metadata_expiry_and_the_session_bound(tmp_path):
    """A server of its own (--session-ttl 4, --max-sessions-known 3): owner-only files, 429 past
    the bound, expiry in memory and on disk; then, restarted on the state a kill -9 between a
    turn's cache and its metadata leaves (plus an empty metadata file and a long-idle session):
    it starts, quarantines and names the bad file, and the session resumes exactly at its last
    acknowledged turn, its transcript readable before it is loaded."""
    import json
    import stat
    import time

    from streamingllm.models import ModelLoadError, default_gguf_path
    from streamingllm.serve.logs import redact

    try:
        default_gguf_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    base = ("--window-size", "60", "--max-tokens", "8")
    srv = Server(tmp_path, *base, "--session-ttl", "4", "--max-sessions-known", "3")
    srv.start()
    try:
        a = srv.new_session()
        conv = [{"role": "user", "content": "Name a colour."}]
        first = _session_turn(srv, a, conv)
        acknowledged = {p.name: p.read_bytes() for p in tmp_path.glob(f"{a}.*")}  # a.json and a.1.pt
        transcript = srv.http("GET", f"/v1/sessions/{a}").json()["messages"]
        conv += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "Another one?"}]
        second = _session_turn(srv, a, conv)
        newer = (tmp_path / f"{a}.2.pt").read_bytes()
        assert sorted(acknowledged) == [f"{a}.1.pt", f"{a}.json"] and not (tmp_path / f"{a}.1.pt").exists()
        assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("sess-*")} == {0o600}
        srv.new_session(), srv.new_session()
        r = srv.http("POST", "/v1/sessions", json={})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
        assert "--max-sessions-known" in r.json()["error"]["message"] and srv.metric("streamingllm_sessions_known") == 3
        still_serves(srv)
        deadline = time.monotonic() + 30
        while srv.metric("streamingllm_sessions_known") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert srv.metric("streamingllm_sessions_expired_total") == 3 and not list(tmp_path.glob("sess-*"))
        assert srv.http("GET", f"/v1/sessions/{a}").status_code == 404 and srv.new_session()
        srv.stop()
        for name, data in acknowledged.items():  # a kill -9 after turn 2's cache rename, before its metadata's
            (tmp_path / name).write_bytes(data)
        (tmp_path / f"{a}.2.pt").write_bytes(newer)
        corrupt = tmp_path / ("sess-" + "x" * 24 + ".json")
        corrupt.write_text("")
        idle = "sess-" + "i" * 24
        (tmp_path / f"{idle}.json").write_text(json.dumps({**json.loads(acknowledged[f"{a}.json"]), "version": 0,
                                                           "last_used": time.time() - 2 * 86400}))
        srv.flags = base  # the default --session-ttl (24 h)
        srv.start()
        assert redact(str(corrupt)) in (tmp_path / "server.log").read_text()  # named (its id redacted, point 18)
        assert (tmp_path / (corrupt.name + ".corrupt")).exists() and not corrupt.exists()
        assert srv.metric("streamingllm_state_files_quarantined_total") == 1
        assert srv.metric("streamingllm_sessions_expired_total") == 1 and not (tmp_path / f"{idle}.json").exists()
        assert not (tmp_path / f"{a}.2.pt").exists()  # the unacknowledged turn is gone
        info = srv.http("GET", f"/v1/sessions/{a}").json()
        assert not info["resident"] and info["saved"] and info["turns"] == 1 and info["messages"] == transcript
        again = _session_turn(srv, a, conv)
        assert again["session"]["status"] == "restored"
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == first["session"]["seen_tokens"]
        assert again["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
        still_serves(srv)
    finally:
        srv.stop()


# --- browser-facing hardening (point 17) ----------------------------------------------------------------


def test_only_the_servers_own_host_names_are_answered(hostile):
    """DNS rebinding: a page at evil.example whose name now points at 127.0.0.1 sends
    ``Host: evil.example``: 400 on every path, whatever the key. The bind address, localhost and
    [::1] (with or without a port) are answered."""
    for host in ("evil.example", f"evil.example:{hostile.port}", "127.0.0.1.evil.example"):
        for path in ("/", "/health", "/v1/models"):
            r = hostile.http("GET", path, headers={"Host": host})
            assert r.status_code == 400 and "--allowed-hosts" in r.json()["error"]["message"], (host, path, r.text)
    for host in (f"127.0.0.1:{hostile.port}", "localhost", f"LOCALHOST:{hostile.port}", f"[::1]:{hostile.port}"):
        assert hostile.http("GET", "/v1/models", headers={"Host": host}).status_code == 200, host
    still_serves(hostile)


def test_the_page_is_locked_down_and_nothing_comes_from_a_cdn(hostile):
    """``/`` sends a Content-Security-Policy (its own script and style only, requests to this
    server only, no framing), X-Frame-Options and nosniff; there is no /docs page (it loads
    Swagger from a CDN), the OpenAPI description stays."""
    r = hostile.http("GET", "/")
    assert r.status_code == 200
    csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert csp["script-src"].startswith("'sha256-") and "unsafe" not in r.headers["content-security-policy"]
    for response in (r, hostile.http("GET", "/health")):
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
    for path in ("/docs", "/redoc"):
        assert hostile.http("GET", path).status_code == 404
    assert hostile.http("GET", "/openapi.json").json()["info"]["title"] == "streamingllm"
    still_serves(hostile)
