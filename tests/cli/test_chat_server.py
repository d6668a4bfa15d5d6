"""``streamingllm chat --server URL`` against a real ``streamingllm serve`` application (the default
model, uvicorn on loopback, in this process): replies stream from the server, /stats shows the
server session's numbers, Ctrl-C stops a reply and keeps the conversation, the server's errors and
an unreachable server are one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest

from chat_driver import interrupt_a_story
from serving import free_port
from streamingllm.cli import main

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def server(smollm):
    """The default model served on a 4 + 124 token cache per session, in a background thread."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from streamingllm.serve.server import ServerSettings, build_app

    app, engine = build_app(*smollm, MODEL, ServerSettings(window_size=124))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with opener.open(f"{url}/health", timeout=2) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                if time.monotonic() > deadline or not thread.is_alive():
                    pytest.fail("the server did not start within 60 s")
                time.sleep(0.2)
        yield SimpleNamespace(url=url, store=app.state.store)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        engine.stop()


def _chat(*flags: str) -> list[str]:
    return [sys.executable, "-m", "streamingllm.cli", "chat", *flags]


def _before_kept(err: str) -> str:
    """stderr up to the last line, which says the server session was kept."""
    *before, last = err.rstrip().splitlines()
    assert last.startswith("[server session ") and " kept; continue it with " in last, err
    return "\n".join(before)


def test_chat_talks_to_the_server(server, tmp_path):
    script = f"What is the capital of France?\n/save {tmp_path / 'c.pt'}\n/stats\n"
    run = subprocess.run(_chat("--server", server.url, "--max-new-tokens", "20"), input=script,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bot> ") and "Paris" in lines[0]
    assert f"streamingllm chat: {MODEL} at {server.url}, cache 4+124 tokens per session" in run.stderr
    assert "error: /save works in a local chat only" in run.stderr and not (tmp_path / "c.pt").exists()
    # after the reply (numbers from the stream's last chunk), and /stats (asked from the server): the
    # server session's cache of 4 + 124 tokens, not this command's default 4 + 1020
    stats = re.findall(r"\[server cache (\d+)/(\d+) tokens \(\d+% full\), (\d+) seen, (\d+) turns\]", run.stderr)
    assert len(stats) == 2 and stats[0] == stats[1], run.stderr
    cached, room, seen, turns = map(int, stats[1])
    assert room == 128 and 0 < cached <= room and seen >= cached and turns == 1
    # the server keeps the session when the chat ends, and the chat says how to continue it
    kept = re.search(rf"\[server session (\S+) kept; continue it with --server {server.url} --session (\S+)\]",
                     run.stderr)
    assert kept and kept[1] == kept[2], run.stderr
    sid = kept[1]
    assert server.store.describe(sid)["turns"] == 1
    again = subprocess.run(_chat("--server", server.url, "--session", sid, "--max-new-tokens", "20"),
                           input="What did I just ask you?\n/quit\n", capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"continuing session {sid} (1 turn so far)" in again.stderr
    assert again.stderr.count(", 2 turns]") == 1 and f"[server session {sid} kept" in again.stderr
    described = server.store.describe(sid)
    assert described["turns"] == 2 and described["messages"][0]["content"] == "What is the capital of France?"
    server.store.delete(sid)


def test_ctrl_c_stops_a_server_reply_and_keeps_the_conversation(server):
    code, out, err = interrupt_a_story(_chat("--server", server.url, "--max-new-tokens", "200", "--system",
                                             "You are a helpful assistant."))
    assert code == 0, err
    assert "[stopped]" in err and _before_kept(err).endswith("2 turns]"), err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("bot> ") and "Paris" in lines[-1], out


def test_the_servers_error_is_shown_and_the_chat_goes_on(server):
    stops = [arg for i in range(5) for arg in ("--stop", f"STOP{i}")]  # the server takes 4
    run = subprocess.run(_chat("--server", server.url, "--max-new-tokens", "5", *stops), input="Hi\n/stats\n",
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert re.search(r"error: the server at \S+ answered 400 to POST /v1/chat/completions: .*stop", run.stderr)
    assert "Traceback" not in run.stderr and _before_kept(run.stderr).endswith("0 turns]")


def test_an_unknown_session_is_one_line(server, capsys):
    assert main(["chat", "--server", server.url, "--session", "no-such-session"]) == 2
    err = capsys.readouterr().err
    assert "answered 404 to GET /v1/sessions/no-such-session" in err and len(err.strip().splitlines()) == 1


def test_an_unreachable_server_is_one_line(capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there once the probe socket is closed
    assert main(["chat", "--server", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"streamingllm: error: cannot reach the server at {url}: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
