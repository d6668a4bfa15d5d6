"""Start ``streamingllm serve`` on a free loopback port for a benchmark script (shared by them)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx


def start_server(*flags: str, wait_s: float = 180) -> tuple[subprocess.Popen, str]:
    """``(process, base URL)`` of a server started with ``flags``, once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "streamingllm.cli", "serve", "--port", str(port),
                             "--log-level", "warning", *flags], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start (run the same `streamingllm serve` by hand to see why)")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
