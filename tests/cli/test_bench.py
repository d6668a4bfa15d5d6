"""``streamingllm bench``: one-line errors naming the flag, and end-to-end runs on a tiny model folder."""

from __future__ import annotations

import pytest

from streamingllm import bench
from streamingllm.cli import main
from tiny import tiny_config


@pytest.mark.parametrize("argv, message", [
    (["bench", "decode", "--sizes", "4", "256"], "--sizes must each be > the sink size (4)"),
    (["bench", "decode", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["bench", "decode", "--recompute-steps", "0"], "--recompute-steps must be an integer >= 1"),
    (["bench", "decode", "--sizes", "64", "64"], "--sizes must not repeat a value, got [64, 64]"),
    (["bench", "stream", "--sample-every", "0"], "--sample-every must be an integer >= 1, got 0"),
    (["bench", "stream", "--max-dense-tokens", "-5"], "--max-dense-tokens must be an integer >= 0, got -5"),
    (["bench", "stream", "--mode", "beam"], "--mode must be one of generate, teacher-forced, got 'beam'"),
    (["bench", "stream", "--chunk-size", "4"], "--chunk-size must be 1 in generate mode"),
    (["bench", "stream", "--num-tokens", "500"],
     "--num-tokens must exceed the streaming cache (--sink-size + --window-size = 1024 tokens) so that it fills and "
     "evicts; lower --window-size or raise --num-tokens, got 500"),
    (["bench", "stream", "--random-weights", "--mode", "teacher-forced", "--text-file", "x.txt"], "--text-file needs"),
    (["bench", "stream", "--text-file", "x.txt"], "--text-file is for --mode teacher-forced"),
    (["bench", "stream", "--window-size", "9000", "--num-tokens", "20000"], "--window-size with --sink-size 4 must keep"),
    (["bench", "decode", "--threads", "0"], "--threads must be an integer >= 1"),
    (["bench", "decode", "--recompute-logits", "none"], "--recompute-logits must be one of all, last, got 'none'"),
    (["bench", "decode", "--variants", "bfloat16+int4"],
     "--variants takes DTYPE[+QUANTIZE] (quantize must be one of none, int8, got 'int4'), got 'bfloat16+int4'"),
    (["bench", "decode", "--variants", "float8"], "--variants takes DTYPE[+QUANTIZE] (dtype must be one of"),
    (["bench", "decode", "--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["bench", "decode", "--batch", "1", "2", "--sizes", "4"], "--sizes must each be > the sink size (4)"),
    (["bench", "decode", "--batch", "2", "--methods", "dense"],
     "--batch times the streaming cache alone: not with --methods"),
    (["bench", "decode", "--batch", "2", "--variants", "bfloat16", "--recompute-steps", "2"],
     "--batch times the streaming cache alone: not with --variants, --recompute-steps"),
])
def test_cli_bench_bad_arguments(argv, message, capsys):
    assert main(argv) == 2  # refused before any model is loaded
    err = capsys.readouterr().err
    assert err.startswith(f"streamingllm: error: {message}") and err.count("\n") == 1  # one line, no traceback


def test_cli_bench_refuses_an_out_file_and_unreadable_text(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["bench", "decode", "--out", str(tmp_path / "f")]) == 2
    assert "--out must be a folder, not a file" in capsys.readouterr().err
    argv = ["bench", "stream", "--mode", "teacher-forced", "--text-file"]
    assert main([*argv, str(tmp_path / "missing.txt")]) == 2
    assert "--text-file cannot be read (No such file or directory)" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("  \n")
    assert main([*argv, str(tmp_path / "empty.txt")]) == 2
    assert "--text-file is empty" in capsys.readouterr().err


def test_cli_bench_end_to_end_on_a_tiny_model_folder(tmp_path, capsys, read_csv, assert_png):
    folder = tmp_path / "tiny"
    tiny_config("llama").save_pretrained(folder)
    out = tmp_path / "out"
    common = ["--model", str(folder), "--random-weights", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(["bench", "decode", "--sizes", "8", "16", "--steps", "3", "--warmup", "1", "--methods", "streaming",
                 "dense", "recompute", *common]) == 0
    assert main(["bench", "stream", "--num-tokens", "120", "--sample-every", "40", "--window-size", "20",
                 "--max-dense-tokens", "80", *common]) == 0
    printed = capsys.readouterr().out
    assert "stream speed-up" in printed and "storage growth after it filled" in printed
    assert "dense arm stopped after 80 tokens (max_dense_tokens)" in printed
    header, rows = read_csv(out / "decode.csv")
    assert header == bench.DECODE_COLUMNS and len(rows) == 6
    header, rows = read_csv(out / "stream.csv")
    assert header == bench.STREAM_COLUMNS and [r["tokens"] for r in rows] == ["40", "80", "120", "40", "80"]
    assert_png(out / "decode.png")
    assert_png(out / "stream.png")


def test_cli_bench_decode_batch_writes_its_rows_on_a_tiny_model_folder(tmp_path, capsys, read_csv):
    """``bench decode --batch`` (once benchmarks/batched_decode.py): one row per cache size and
    batch size, in batch.csv and the printed table; no decode.csv, no plot."""
    folder = tmp_path / "tiny"
    tiny_config("llama").save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["bench", "decode", "--batch", "1", "3", "--sizes", "8", "16", "--steps", "2", "--warmup", "1",
                 "--model", str(folder), "--random-weights", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "batch: sizes 8 16, batch 1 3, steps 2, warmup 1" in printed
    lines = [ln.split() for ln in printed.splitlines() if ln.split()[:1] in (["8"], ["16"])]
    assert [ln[:2] for ln in lines] == [["8", "1"], ["8", "3"], ["16", "1"], ["16", "3"]]
    assert all(ln[-3] == "1.00x" for ln in lines if ln[1] == "1")  # speed-up (then limit ms, vs limit)
    header, rows = read_csv(out / "batch.csv")
    assert header == bench.BATCH_COLUMNS
    assert [(r["size"], r["batch"], r["stacked"], r["steps"]) for r in rows] == [
        ("8", "1", "False", "2"), ("8", "3", "True", "2"), ("16", "1", "False", "2"), ("16", "3", "True", "2")]
    assert all(float(r["speedup"]) == 1.0 for r in rows if r["batch"] == "1")
    assert sorted(p.name for p in out.iterdir()) == ["batch.csv"]


def test_cli_bench_help_shows_every_flag_and_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "stream", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help lines wrap with the terminal's width
    for flag in ("--num-tokens", "--sample-every", "--max-dense-tokens", "--mode", "--methods", "--window-size",
                 "--chunk-size", "--text-file", "--compile", "--model", "--dtype", "--device", "--random-weights",
                 "--seed", "--sink-size", "--threads", "--out", "--no-progress"):
        assert flag in text, flag
    assert "(default: 20000)" in text and "(default: 1020)" in text
