"""A real Redis server for the tests: ``/usr/bin/redis-server`` on a free loopback port, in a
temporary directory, writing every command to its append-only file before answering
(``--appendonly yes --appendfsync always``, no snapshots), so that a restart keeps every
acknowledged write. Tests that need one are skipped, with the reason, where it is not installed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from serving import free_port

REDIS_SERVER = os.environ.get("STREAMINGLLM_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
START_S = 10.0  # seconds a server may take to accept connections


def redis_server_path() -> str | None:
    """The redis-server executable, or None when it is not installed."""
    return REDIS_SERVER if os.access(REDIS_SERVER, os.X_OK) else None


class RedisServer:
    """One redis-server process; :meth:`restart` stops it and starts it again on the same port
    and directory (its data kept), :meth:`kill` ends it with SIGKILL.

    Args:
        directory: where its append-only file and log go.
        port: its TCP port on 127.0.0.1 (None: a free one).
    """

    def __init__(self, directory: str | os.PathLike, port: int | None = None):
        self.directory, self.port = Path(directory), port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        path = redis_server_path()
        if path is None:
            pytest.skip(f"redis-server is not installed (looked for {REDIS_SERVER}; apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [path, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
               "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
               "--logfile", str(self.directory / "redis.log"), "--protected-mode", "yes"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}): {self.log()[-2000:]}")
            if self._answers():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {START_S:g} s: {self.log()[-2000:]}")

    def _answers(self) -> bool:
        """It answers PING (and has loaded its data: a loading server answers -LOADING)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM (it syncs its append-only file and exits), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: what a crash leaves (every acknowledged write is in the append-only file)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


def redis_fixture(scope: str = "function"):
    """A pytest fixture (of ``scope``) yielding a started :class:`RedisServer`, stopped after:
    ``redis = redis_fixture("module")`` in a test module."""

    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory):
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        server.start()
        try:
            yield server
        finally:
            server.stop()

    return fixture
