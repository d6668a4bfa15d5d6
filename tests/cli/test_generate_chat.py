"""Command-line behaviour of generate/chat and the top level: one-line errors naming the flag
(exit 2, no traceback), help with defaults, --version, and streaming on the default model."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from chat_driver import interrupt_a_story

import streamingllm
from streamingllm.cli import generate, main
from streamingllm.cli.generate import read_prompt
from streamingllm.cli.options import CommandError
from streamingllm.client import ServerError
from streamingllm.evals.corpus import CorpusError
from streamingllm.extras import MissingExtraError
from streamingllm.families import UnsupportedModelError
from streamingllm.models import ModelLoadError
from streamingllm.timeline import ApproximateChunkError


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "   "], "prompt is empty"),
        (["generate", "--text-file", "/nonexistent/prompt.txt"], "cannot read"),
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
        (["generate", "hi", "--text-file", "p.txt"], "--text-file cannot be combined with a prompt argument"),
        (["generate", "hi", "--prompt-file", "p.txt"], "--text-file cannot be combined"),  # the old spelling
        (["generate", "hi", "--window-size", "100000"], "--window-size with --sink-size 4 must keep the cache below "
                                                        "the model's trained length of 8192 tokens (--window-size at "
                                                        "most 8187; --beyond-trained-length allows more"),
        (["chat", "--window-size", "8188"], "trained length of 8192 tokens"),
        (["chat", "--session", "abc"], "--session needs --server URL"),
        (["chat", "--server", "ftp://127.0.0.1"], "--server must be an http:// or https:// URL"),
        (["chat", "--server", "http://127.0.0.1:9", "--memory"], "--memory is the server's setting with --server"),
        (["chat", "--server", "http://127.0.0.1:9", "--evict", "turns"], "--evict is the server's setting"),
        (["chat", "--memory", "--block-size", "0"], "--block-size must be an integer >= 1, got 0"),
        (["chat", "--memory", "--block-size", "4", "--repr-keys", "8"], "--repr-keys must be at most --block-size (4)"),
    ],
)
def test_bad_input_gives_one_line_naming_the_flag(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _raising(error: BaseException):
    def run(args):
        raise error
    return run


@pytest.mark.parametrize("error", [CorpusError("no text"), UnsupportedModelError("not this model"),
                                   ModelLoadError("no such model"), MissingExtraError("pip install it"),
                                   ServerError("the server said no"), CommandError("the prompt is empty"),
                                   ApproximateChunkError(40, 8, 32)])
def test_documented_errors_are_one_line(error, monkeypatch, capsys):
    monkeypatch.setattr(generate, "run", _raising(error))
    assert main(["generate", "hi"]) == 2
    assert capsys.readouterr().err == f"streamingllm: error: {error}\n"


@pytest.mark.parametrize("bug", [TypeError("a bug"), ValueError("a bug"), KeyError("a bug"), RuntimeError("a bug")])
def test_any_other_exception_is_a_bug_and_propagates(bug, monkeypatch, capsys):
    monkeypatch.setattr(generate, "run", _raising(bug))
    with pytest.raises(type(bug)) as info:
        main(["generate", "hi"])
    assert info.value is bug and capsys.readouterr().err == ""


def test_a_bug_prints_its_traceback():
    """End to end: the command exits with Python's status 1 and the traceback, not a one-line error."""
    code = ("import streamingllm.cli.generate as g, sys\n"
            "def run(args):\n    raise TypeError('a bug in run')\n"
            "g.run = run\n"
            "from streamingllm.cli import main\n"
            "sys.exit(main(['generate', 'hi']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" in run.stderr and "TypeError: a bug in run" in run.stderr
    assert "streamingllm: error" not in run.stderr


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_a_model_without_a_chat_template_is_refused_before_its_weights_load(command, tmp_path, monkeypatch, capsys):
    """The tokenizer is enough to refuse a base model: its weights are never read."""
    from types import SimpleNamespace

    import transformers

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: SimpleNamespace(chat_template=None))

    def weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", weights)
    assert main([command, "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"streamingllm: error: --model must be a chat (instruct) model: its tokenizer "
                                       f"has no chat template, got '{tmp_path}'\n")


def test_a_cache_past_the_trained_length_is_refused_before_loading(monkeypatch, capsys):
    """A named model's trained length is known before loading; other models are checked once loaded,
    before their cache allocates; --beyond-trained-length opts in."""
    from types import SimpleNamespace

    import streamingllm.models
    from streamingllm.checks import ArgumentError
    from streamingllm.cli.options import check_trained_length

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(streamingllm.models, "load", load)
    assert main(["generate", "hi", "--window-size", "100000"]) == 2
    assert "--window-size" in capsys.readouterr().err
    args = SimpleNamespace(model="some/folder", sink_size=4, window_size=60, beyond_trained_length=False)
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    check_trained_length(args)  # unknown before loading
    with pytest.raises(ArgumentError, match="trained length of 64 tokens"):
        check_trained_length(args, model)
    args.window_size = 59
    check_trained_length(args, model)
    args.window_size, args.beyond_trained_length = 100000, True
    check_trained_length(args, model)


def test_first_use_assembly_of_a_named_model_is_announced(tmp_path, monkeypatch):
    """gemma3-270m's 253 MB file is assembled on first use: one line says so before, none after."""
    import importlib
    import importlib.util
    from types import SimpleNamespace

    from streamingllm import models

    events = []

    def assemble(path, overwrite=False):
        events.append("assemble")
        path.write_text("gguf")
        return path

    fake = SimpleNamespace(MODEL_NAME="gemma.gguf", assemble=assemble, default_output_path=lambda: tmp_path / "x")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib, "import_module", lambda name: fake)
    assert models.gemma3_gguf_path(tmp_path, announce=events.append) == tmp_path / "gemma.gguf"
    assert len(events) == 2 and events[0].startswith("assembling gemma3-270m") and events[1] == "assemble"
    models.gemma3_gguf_path(tmp_path, announce=events.append)  # kept: checked, not assembled again
    assert events[2:] == ["assemble"]


def test_the_command_line_loads_with_the_announcement_on_stderr(monkeypatch, capsys):
    from types import SimpleNamespace

    import streamingllm.models
    from streamingllm.cli.options import load_model

    def load(name, **kwargs):
        kwargs["announce"]("assembling something")
        return "model", "tokenizer"

    monkeypatch.setattr(streamingllm.models, "load", load)
    args = SimpleNamespace(model="gemma3-270m", dtype="float32", device="cpu", quantize="none")
    assert load_model(args) == ("model", "tokenizer")
    assert capsys.readouterr().err == "streamingllm: assembling something\n"


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
    for command in ("generate", "chat", "serve", "perplexity", "attention", "streameval", "passkey", "pretrain",
                    "bench"):
        assert len(re.findall(rf"^ {{2,4}}{command}\b", out, re.M)) == 1, out  # listed once


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
    assert re.search(r"\[done: decode 200 tokens, [\d.]+ tok/s, cache 64/64 tokens \([\d.]+ MiB\), seen \d+",
                     run.stderr)


@pytest.mark.slow
def test_generate_with_int8_weights_and_the_compiled_step(compile_as_identity, capsys):
    """--dtype bfloat16 --quantize int8 --compile on, end to end on the default model (torch.compile
    stands in as the identity: a real compilation is tested in tests/core/test_compiled.py): the
    warm-up is announced once, and every step after the 4 + 28 cache filled went the prepared way."""
    import torch

    from streamingllm.precision import Int8Linear

    argv = ["generate", "Once upon a time", "--dtype", "bfloat16", "--quantize", "int8", "--compile", "on",
            "--window-size", "28", "--max-new-tokens", "80"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert len(out.out.split()) > 20
    assert out.err.count("compiling the decode step for a 32-token cache") == 1
    model = compile_as_identity.functions[0].__self__
    assert isinstance(model.lm_head, Int8Linear) and model.dtype == torch.bfloat16
    assert len(compile_as_identity.calls) >= 80 - 32


@pytest.mark.slow
def test_a_cache_too_large_for_memory_is_refused_before_allocating(capsys):
    assert main(["generate", "hi", "--window-size", "10000000000", "--max-new-tokens", "1",
                 "--beyond-trained-length"]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and "lower --window-size" in err and "Traceback" not in err


@pytest.mark.slow
def test_chat_survives_ctrl_c_and_keeps_the_conversation(tmp_path):
    """Ctrl-C during a reply stops that reply only: the chat answers the next line, /stats counts
    both turns, and stdout has one line per reply."""
    code, out, err = interrupt_a_story([sys.executable, "-m", "streamingllm.cli", "chat", "--max-new-tokens", "200",
                                        "--window-size", "252", "--system", "You are a helpful assistant."])
    assert code == 0, err
    assert "[stopped]" in err and "2 turns" in err
    lines = out.strip().splitlines()
    assert "Paris" in lines[-1] and lines[-1].startswith("bot> ")


@pytest.mark.slow
def test_chat_commands_save_reset_load_and_report_errors(tmp_path):
    saved = tmp_path / "c.pt"
    script = (f"What is the capital of France?\n/save {saved}\n/reset\n/stats\n/load {saved}\n/bogus\n"
              f"/load {tmp_path / 'missing.pt'}\nAnd of Italy?\n/stats\n")
    run = subprocess.run([sys.executable, "-m", "streamingllm.cli", "chat", "--max-new-tokens", "30", "--window-size",
                          "200", "--system", "You are a helpful assistant."], input=script, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [line for line in run.stdout.splitlines() if line.startswith("bot> ")]
    assert "Paris" in run.stdout and "Rome" in run.stdout  # the loaded conversation went on
    assert "[conversation reset]" in run.stderr and "0 seen, 0 turns" in run.stderr
    assert "error: unknown command /bogus" in run.stderr and "cannot read a saved conversation" in run.stderr
    assert run.stderr.rstrip().endswith("2 turns]")


class _Echo:
    """A conversation that answers every message with "ok" and counts what it was sent."""

    interruptible, can_save = False, False

    def __init__(self):
        self.messages, self.sent = [], []

    def reply(self, text):
        self.sent.append(text)
        yield "ok"

    def stats(self, refresh=False):
        return {"seen_tokens": 0, "cached_tokens": 0, "max_cached_tokens": 8, "pinned_tokens": 0,
                "turns": len(self.sent)}


@pytest.mark.parametrize("last", ["/quit", "/exit", None])  # None: Ctrl-D
def test_an_empty_line_at_the_prompt_does_not_end_the_chat(last, monkeypatch, capsys):
    """At a terminal, Enter on an empty line does nothing; only /quit, /exit or Ctrl-D end the chat."""
    from streamingllm.cli import chat

    lines = iter(["", "hello", "   ", "", "again", last, "never read"])

    def typed(prompt=""):
        line = next(lines)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", typed)
    echo = _Echo()
    assert chat._loop(echo, "cache", interactive=True) == 0
    assert echo.sent == ["hello", "again"] and next(lines) == "never read"


def test_a_piped_chat_ends_at_quit_or_the_end_of_input(monkeypatch, capsys):
    from streamingllm.cli import chat

    for script, sent in (("\n\nhello\n\n/quit\nnot sent\n", ["hello"]), ("hello\n\nagain\n", ["hello", "again"])):
        monkeypatch.setattr(sys, "stdin", io.StringIO(script))
        echo = _Echo()
        assert chat._loop(echo, "cache", interactive=False) == 0
        assert echo.sent == sent
    assert capsys.readouterr().out.count("bot> ok") == 3
