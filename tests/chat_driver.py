"""Drive ``streamingllm chat`` as a person at a pipe would (shared by the local and --server tests)."""

from __future__ import annotations

import signal
import subprocess
import time


def interrupt_a_story(cmd: list[str]) -> tuple[int, str, str]:
    """Ask for a long story, press Ctrl-C while it streams, then ask a question and /stats.
    Returns ``(exit status, stdout, stderr)``."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write("Tell me a long story about a lighthouse keeper.\n")
    proc.stdin.flush()
    assert proc.stdout.read(5) == "bot> "
    proc.stdout.read(20)  # the reply is streaming
    proc.send_signal(signal.SIGINT)
    time.sleep(1)
    proc.stdin.write("What is the capital of France?\n/stats\n")
    proc.stdin.close()
    out, err = proc.stdout.read(), proc.stderr.read()  # until the chat exits at end of input
    return proc.wait(timeout=300), out, err
