"""A real ``streamingllm serve`` in a subprocess (the default model, uvicorn, loopback), for the
server tests and the chat client's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY = "test-key"
MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``streamingllm serve`` in a subprocess; :meth:`restart` stops it and starts it again on the
    same port and state directory.

    Args:
        state_dir: its state directory (and where its log goes).
        flags: more command-line options.
        store: ``--session-store`` instead of ``--state-dir state_dir`` (e.g. a ``redis://`` URL).
        start_s: seconds it may take to answer ``/health`` (replicas on Ray take longer).
    """

    def __init__(self, state_dir, *flags: str, store: str | None = None, start_s: float = 180):
        self.port, self.state_dir, self.flags = free_port(), state_dir, flags
        self.store, self.start_s = store, start_s
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        where = ["--session-store", self.store] if self.store else ["--state-dir", str(self.state_dir)]
        cmd = [sys.executable, "-m", "streamingllm.cli", "serve", "--port", str(self.port), "--api-key", API_KEY,
               *where, "--log-level", "warning", *self.flags]
        self.log = open(self.state_dir / "server.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        deadline = time.monotonic() + self.start_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited: {(self.state_dir / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        pytest.fail(f"the server did not start within {self.start_s:g} s")

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL to its whole process group: a Ray cluster's daemons too)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of its group (Ray's daemons)
            except (ProcessLookupError, PermissionError):
                pass
        self.log.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)

    def http(self, method: str, path: str, **kwargs):
        headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=300, **kwargs)

    def new_session(self, pin_system: bool = False) -> str:
        r = self.http("POST", "/v1/sessions", json={"pin_system": pin_system})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    def metric(self, name: str, default: float | None = None) -> float:
        """A sample of /metrics by its exact name (labels included), or ``default`` when absent."""
        for line in self.http("GET", "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        if default is None:
            raise KeyError(name)
        return default


def running_server(state_dir, *flags: str, store: str | None = None, start_s: float = 180):
    """Yield a started :class:`Server` of the default model with ``flags`` and stop it after (the body
    of a fixture: ``yield from running_server(...)``); the test is skipped when the model is not
    installed."""
    from streamingllm.models import ModelLoadError, default_gguf_path

    try:
        default_gguf_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    srv = Server(state_dir, *flags, store=store, start_s=start_s)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def assert_overload_refused(server, requests: int, served_at_least: int, tokens: int = 40) -> None:
    """``requests`` chat requests of ``tokens`` tokens each at once: at least ``served_at_least``
    are served, the others refused with 503, ``Retry-After`` and OpenAI's ``overloaded_error``,
    and at least one is refused."""
    import threading

    results = []

    def ask(i):
        r = server.http("POST", "/v1/chat/completions", json={"model": MODEL, "max_tokens": tokens, "min_tokens": tokens,
                                                              "messages": [{"role": "user", "content": f"Count from {i} to 100."}]})
        results.append(r)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= served_at_least and set(codes) <= {200, 503}, codes
    refused = [r for r in results if r.status_code == 503]
    assert refused and all(r.headers["retry-after"].isdigit() and r.json()["error"]["type"] == "overloaded_error"
                           for r in refused)
