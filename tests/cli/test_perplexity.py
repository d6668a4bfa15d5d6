"""``streamingllm perplexity``: bad input fails at once in one line naming its flag (before the
text is read or a model loaded); a whole run on a tiny model writes the table, CSVs and figures."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

import streamingllm.cli.perplexity as perplexity_cli
from streamingllm.cli import main
from streamingllm.evals import corpus
from tiny import VOCAB, tiny_model


def _must_not_run(*args, **kwargs):
    raise AssertionError("the text was read or the model loaded although an option is bad")


@pytest.fixture
def nothing_loaded(monkeypatch):
    monkeypatch.setattr(perplexity_cli, "load_model", _must_not_run)
    monkeypatch.setattr(corpus, "austen_text", _must_not_run)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("streamingllm: error: "), err
    return err.strip()


AUSTEN = ["perplexity", "--corpus", "austen"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (AUSTEN + ["--methods", "dense", "sliding"],
         "--methods must be one of dense, window, recompute, streaming, memory, got 'sliding'"),
        (AUSTEN + ["--window-size", "0"], "--window-size must be an integer >= 1, got 0"),
        (AUSTEN + ["--sink-size", "4", "-2"], "--sink-size must be an integer >= 0, got -2"),
        (AUSTEN + ["--sink-size", "8", "--cache-size", "8"], "--cache-size must be larger than the sink size 8"),
        (AUSTEN + ["--recompute-every", "0"], "--recompute-every must be 'auto' or an integer >= 1, got 0"),
        (AUSTEN + ["--recompute-every", "often"], "--recompute-every must be 'auto' or an integer >= 1, got 'often'"),
        (AUSTEN + ["--num-tokens", "1"], "--num-tokens must be an integer >= 2, got 1"),
        (AUSTEN + ["--offset", "-1"], "--offset must be an integer >= 0, got -1"),
        (AUSTEN + ["--chunk-size", "0"], "--chunk-size must be an integer >= 1, got 0"),
        (AUSTEN + ["--max-dense-tokens", "1"], "--max-dense-tokens must be an integer >= 2, got 1"),
        (AUSTEN + ["--segment-tokens", "0"], "--segment-tokens must be an integer >= 1, got 0"),
        (AUSTEN + ["--smooth", "0"], "--smooth must be an integer >= 1, got 0"),
        (AUSTEN + ["--sink-text", ""], "--sink-text must be the text whose tokens become the sinks"),
        (["perplexity"], "give exactly one text source"),
        (AUSTEN + ["book.txt"], "give exactly one text source: text files ('-' = stdin), a corpus (--corpus austen, or "
                                "austen:NOVEL for one novel) "
                                "or a Hugging Face dataset (--dataset NAME); got files and corpus"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(argv, message, capsys, nothing_loaded):
    assert main(argv) == 2
    assert message in one_line_error(capsys)


def test_unreadable_and_empty_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(perplexity_cli, "load_model", _must_not_run)
    assert main(["perplexity", "/nonexistent/book.txt", "--out", str(tmp_path)]) == 2
    assert "cannot read text file /nonexistent/book.txt" in one_line_error(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["perplexity", str(empty), "--out", str(tmp_path)]) == 2
    assert "the text of empty.txt is empty" in one_line_error(capsys)


def test_offline_hub_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(perplexity_cli, "load_model", _must_not_run)
    argv = ["perplexity", "--dataset", "no-such-org/no-such-dataset", "--num-tokens", "100", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "no-such-org/no-such-dataset" in err
    try:
        import datasets  # noqa: F401  (the hub extra)
    except ImportError:
        assert "need the optional package 'datasets': pip install 'streamingllm[hub]'" in err
    else:
        assert "offline" in err.lower() or "could not" in err.lower()


class CharTokenizer:
    """One token per character, and a BOS (1) when special tokens are asked for."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [2 + ord(c) % (VOCAB - 2) for c in text]
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)


def test_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    model = tiny_model("llama", max_position_embeddings=28)
    monkeypatch.setattr(perplexity_cli, "load_model", lambda args: (model, CharTokenizer()))
    titles = []
    real_plot = perplexity_cli.plot_curves

    def plot_curves(*args, **kwargs):
        titles.append(kwargs["title"])
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(perplexity_cli, "plot_curves", plot_curves)
    book = tmp_path / "deep" / "folder" / "book.txt"
    book.parent.mkdir(parents=True)
    book.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3)
    out = tmp_path / "out"
    argv = ["perplexity", str(book), "--num-tokens", "120", "--sink-size", "0", "4", "--cache-size", "24", "32",
            "--recompute-every", "5", "--sink-text", "\\n", "--chunk-size", "16", "--smooth", "16", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    for label in ("dense", "window 0+24", "recompute 32", 'streaming 4"\\n"+28', "@recompute", "every 5th token"):
        assert label in captured.out
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert warning == ["streamingllm: warning: cache size 32 reaches the model's trained length 28: "
                       "positions from 28 on were never trained"]
    assert titles == ["smollm2-135m on book.txt: 120 tokens"]  # the file's name, not its folders
    with open(out / "nll.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({r["label"] for r in rows}) == 1 + 2 + 2 + 4 and len(rows) == 7 * 119 + 2 * len(range(5, 120, 5))
    written = [f"{out / name}" for name in ("nll.csv", "summary.csv", "curves.png", "sweep.png")]
    assert f"wrote {', '.join(written)}" in captured.err
    for name in ("curves.png", "sweep.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_perplexity_cli_end_to_end(tmp_path, capsys):
    """All four methods on a short text through the CLI: the summary, CSV and PNGs are written."""
    book = tmp_path / "book.txt"
    book.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 20)
    out = tmp_path / "out"
    argv = ["perplexity", str(book), "--num-tokens", "300", "--sink-size", "0", "4", "--cache-size", "48", "64",
            "--recompute-every", "25", "--sink-text", "\\n", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for label in ("dense", "window 0+48", "recompute 64", 'streaming 4"\\n"+60', "@recompute"):
        assert label in table
    with open(out / "nll.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = {r["label"] for r in rows}
    assert len(labels) == 1 + 2 + 2 + 4 and len(rows) == 7 * 299 + 2 * len(range(25, 300, 25))
    for name in ("curves.png", "sweep.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # A repeated sentence is easy once seen: every method but dense at its start predicts it well.
    with open(out / "summary.csv", newline="") as f:
        summary = {r["label"]: float(r["ppl"]) for r in csv.DictReader(f)}
    assert summary['streaming 4"\\n"+60'] < 3 and summary["dense"] < 3
