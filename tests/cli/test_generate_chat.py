"""Command-line behaviour of generate/chat and the top level: one-line errors naming the flag
(exit 2, no traceback), help with defaults, --version, and streaming on the default model."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

import streamingllm
from streamingllm.cli import main
from streamingllm.cli.generate import read_prompt


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "   "], "prompt is empty"),
        (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "cannot read"),
        (["generate", "hi", "--sink-size", "-1"], "--sink-size must be an integer >= 0, got -1"),
        (["generate", "hi", "--window-size", "0"], "--window-size must be an integer >= 1, got 0"),
        (["generate", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be an integer >= 0, got -5"),
        (["generate", "hi", "--temperature", "-1"], "--temperature must be a number >= 0, got -1.0"),
        (["generate", "hi", "--top-p", "0"], "--top-p must be a number > 0 and <= 1, got 0.0"),
        (["generate", "hi", "--chunk-size", "0"], "--chunk-size must be an integer >= 1"),
        (["generate", "hi", "--model", "/nonexistent/model.gguf"], "model file not found"),
        (["generate", "hi", "--model", "./no/such/folder"], "not found"),
        (["generate", "hi", "--device", "tpu"], "--device must be one of cpu, cuda"),
        (["generate", "hi", "--device", "cuda:7"], "got 'cuda:7'"),  # no CUDA here, or no 8th GPU
        (["chat", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
        (["chat", "--chunk-size", "0", "--model", "/nonexistent/x.gguf"], "--chunk-size must be an integer >= 1"),
        (["chat", "--window-size", "-3"], "--window-size must be an integer >= 1"),
        (["chat", "--repetition-penalty", "0"], "--repetition-penalty must be a number > 0, got 0.0"),
        (["generate", "hi", "--presence-penalty", "3"], "--presence-penalty must be a number >= -2 and <= 2, got 3.0"),
        (["chat", "--penalty-last-n", "-1"], "--penalty-last-n must be an integer >= 0, got -1"),
        (["generate", "hi", "--min-new-tokens", "-2"], "--min-new-tokens must be an integer >= 0, got -2"),
    ],
)
def test_bad_input_gives_one_line_naming_the_flag(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_non_integer_size_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "hi", "--window-size", "2.5"])
    assert exit_.value.code == 2 and "--window-size: invalid int value" in capsys.readouterr().err


def test_version_and_top_level_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"streamingllm {streamingllm.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("generate", "chat", "perplexity", "bench"):
        assert command in out


@pytest.mark.parametrize("command", [["generate"], ["chat"], ["perplexity"], ["bench", "decode"], ["bench", "stream"]])
def test_every_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main(command + ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # help wraps lines anywhere
    assert "(default: float32)" in out and "(default: cpu)" in out


def test_prompt_from_a_terminal_says_it_waits(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("Once upon a time"))
    assert read_prompt(None, None) == "Once upon a time"
    assert "reading the prompt from stdin" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_streams_past_the_cache_on_the_default_model():
    """The README's main job, shortened: a 64-token cache, 200 generated tokens; prefill and
    decode speeds are reported apart."""
    cmd = [sys.executable, "-m", "streamingllm.cli", "generate", "The capital of France is",
           "--sink-size", "4", "--window-size", "60", "--max-new-tokens", "200", "--stats"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Paris" in run.stdout
    assert len(run.stdout.split()) > 100  # it kept generating words after the cache filled
    assert "cache 64/64 tokens" in run.stderr  # bounded however long it ran
    assert re.search(r"\[prefill \d+ tokens in [\d.]+ s, [\d.]+ tok/s\]", run.stderr)
    assert re.search(r"\[done: decode 200 tokens, [\d.]+ tok/s, cache 64/64 tokens, seen \d+", run.stderr)


@pytest.mark.slow
def test_a_cache_too_large_for_memory_is_refused_before_allocating(capsys):
    assert main(["generate", "hi", "--window-size", "10000000000", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and "lower --window-size" in err and "Traceback" not in err
