"""What ``--help`` says, and what the command line does with a misspelled flag: every text true
for its command, every default shown, the chat's commands listed, and the default output folders
ignored by git."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamingllm.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # help wraps lines anywhere


@pytest.mark.parametrize("command", [["perplexity"], ["attention"], ["passkey"], ["streameval"], ["bench", "decode"],
                                     ["bench", "stream"], ["generate"], ["chat"], ["serve"]])
def test_quantize_points_to_compile_only_where_the_command_has_it(command):
    parser = build_parser()
    for name in command:
        parser = next(a for a in parser._actions if a.dest in ("command", "what")).choices[name]
    actions = {a.dest: a for a in parser._actions}
    has_compile_on = "compile" in actions and "on" in (actions["compile"].choices or ())
    assert ("--compile on" in actions["quantize"].help) == has_compile_on


def test_generation_help_is_said_for_its_command(capsys):
    generate, chat = _help(capsys, "generate"), _help(capsys, "chat")
    assert "--max-new-tokens MAX_NEW_TOKENS tokens to generate (default: 256)" in generate
    assert "in chat" not in generate and "reply" not in generate.split("--max-new-tokens MAX_NEW_TOKENS", 2)[-1][:60]
    assert "--max-new-tokens MAX_NEW_TOKENS most tokens per reply (default: 256)" in chat
    # the command line's defaults keep the small default model from looping
    assert "small models loop without it) (default: 1.1)" in generate
    assert "small models loop without it) (default: 1.05)" in chat


def test_chat_help_lists_the_chat_commands(capsys):
    out = _help(capsys, "chat")
    for command in ("/reset", "/save FILE", "/load FILE", "/stats", "/help", "/quit", "/exit", "--session ID"):
        assert command in out


def test_serve_help_shows_the_cache_budget_default(capsys):
    assert "--max-cache-mib MAX_CACHE_MIB MiB of cache in memory, all sessions together (default: no limit" in \
        _help(capsys, "serve")


def test_text_files_are_given_one_way(capsys):
    """--text-file wherever a command reads text from a file; the old spellings still work, unlisted."""
    for command in (["generate"], ["perplexity"], ["attention"], ["bench", "stream"]):
        assert "--text-file" in _help(capsys, *command)
    assert "--prompt-file" not in _help(capsys, "generate")
    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt-file", "p.txt"]).text_file == Path("p.txt")
    args = parser.parse_args(["perplexity", "a.txt", "--text-file", "b.txt", "c.txt"])
    assert (args.files, args.text_file) == (["a.txt"], ["b.txt", "c.txt"])


@pytest.mark.parametrize("command", [["chat"], ["generate", "hi"], ["bench", "decode"]])
def test_a_misspelled_flag_shows_its_commands_usage(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--windw-size", "3"])
    err = capsys.readouterr().err
    name = " ".join(c for c in command if c != "hi")
    assert exit_.value.code == 2 and err.startswith(f"usage: streamingllm {name} ")
    assert err.rstrip().endswith(f"streamingllm {name}: error: unrecognized arguments: --windw-size 3")


def test_default_output_folders_are_ignored_by_git():
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    outs = set()
    for name, command in sub.choices.items():
        nested = [a for a in command._actions if a.dest == "what"]  # bench decode|stream
        for p in nested[0].choices.values() if nested else [command]:
            outs |= {str(a.default).split("/")[0] for a in p._actions if a.dest == "out" and a.default}
    outs |= {"ppl", "sessions"}  # the README's --out and --state-dir
    assert outs >= {"perplexity_out", "attention_out", "passkey_out", "streameval_out", "pretrain_out", "bench_out"}
    assert outs <= ignored, outs - ignored
