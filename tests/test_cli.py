"""Command-line behaviour: clear errors on bad input, streaming generation on the default model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamingllm.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "   "], "prompt is empty"),
        (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "cannot read"),
        (["generate", "hi", "--sink-size", "-1"], "--sink-size must be an integer >= 0"),
        (["generate", "hi", "--window-size", "0"], "--window-size must be an integer >= 1"),
        (["generate", "hi", "--max-new-tokens", "-5"], "--max-new-tokens"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "0"], "top_p"),
        (["generate", "hi", "--model", "/nonexistent/model.gguf"], "model file not found"),
        (["generate", "hi", "--model", "./no/such/folder"], "not found"),
    ],
)
def test_bad_input_gives_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_non_integer_size_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--window-size", "2.5"])
    assert "--window-size: invalid int value" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_streams_past_the_cache_on_the_default_model():
    """The README's main job, shortened: a 64-token cache, 200 generated tokens."""
    cmd = [sys.executable, "-m", "streamingllm.cli", "generate", "The capital of France is",
           "--sink-size", "4", "--window-size", "60", "--max-new-tokens", "200", "--stats"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Paris" in run.stdout
    assert len(run.stdout.split()) > 100  # it kept generating words after the cache filled
    assert "cache 64/64 tokens" in run.stderr  # bounded however long it ran
