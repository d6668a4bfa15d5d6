"""Start ``streamingllm serve`` (and a Redis server for it) on free loopback ports for a benchmark
script (shared by them)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str, wait_s: float = 180) -> tuple[subprocess.Popen, str]:
    """``(process, base URL)`` of a server started with ``flags``, once /health answers (in a
    process group of its own: :func:`stop_server` stops a Ray cluster it started too)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamingllm.cli", "serve", "--port", str(port),
                             "--log-level", "warning", *flags], stderr=subprocess.DEVNULL, start_new_session=True)
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
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of its group
    except (ProcessLookupError, PermissionError):
        pass


def start_redis(directory) -> tuple[subprocess.Popen, str]:
    """``(process, redis:// URL)``: Debian's redis-server on a free loopback port, its append-only
    file fsynced at every write (as a deployment that acknowledges turns must run it) in ``directory``."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server, or scripts/setup_services.sh)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("redis-server did not start")
