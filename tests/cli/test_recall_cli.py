"""``streamingllm attention``, ``streameval`` and ``passkey`` as a user runs them: bad input is one
line naming the flag (before any model loads), and each command writes its CSV, PNG and table."""

from __future__ import annotations

import pytest

from streamingllm.cli import main


@pytest.mark.parametrize("argv, flag", [
    (["streameval", "--lines", "0"], "--lines"),
    (["streameval", "--lines", "30", "--distances", "40"], "--distances"),
    (["streameval", "--query-every", "0"], "--query-every"),
    (["streameval", "--methods", "dense", "magic"], "--methods"),
    (["passkey", "--depths", "1.5"], "--depths"),
    (["passkey", "--trials", "0"], "--trials"),
    (["passkey", "--cache-size", "4", "--sink-size", "4"], "--cache-size"),
    (["attention", "--k", "0"], "--k"),
    (["attention", "--num-tokens", "1"], "--num-tokens"),
])
def test_bad_input_is_one_line_naming_the_flag(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_the_commands_write_their_files(tmp_path, read_csv, assert_png, capsys):
    out = tmp_path / "att"
    assert main(["attention", "--random-weights", "--out", str(out)]) == 0
    header, rows = read_csv(out / "sinks.csv")
    assert {r["model"] for r in rows} == {"smollm2-135m", "smollm2-135m (random weights)"} and len(rows) == 60
    trained = [float(r["first_token_share"]) for r in rows if r["model"] == "smollm2-135m"]
    random = [float(r["first_token_share"]) for r in rows if r["model"] != "smollm2-135m"]
    assert max(trained) > 0.5 > 0.2 > max(random)  # the trained model has sinks; random weights none
    for png in ("maps.png", "sinks.png"):
        assert_png(out / png)
    out = tmp_path / "pk"
    assert main(["passkey", "--total-tokens", "300", "--cache-size", "128", "--depths", "0", "0.9", "--trials", "1",
                 "--methods", "window", "streaming", "--out", str(out)]) == 0
    header, rows = read_csv(out / "passkey.csv")
    assert len(rows) == 4 and {r["in_window"] for r in rows} == {"True", "False"}
    assert all(r["correct"] == "0" for r in rows if r["in_window"] == "False")  # evicted: cannot be retrieved
    assert_png(out / "passkey.png")
    out = tmp_path / "se"
    assert main(["streameval", "--lines", "30", "--methods", "streaming", "recompute", "--cache-size", "256",
                 "--out", str(out)]) == 0
    header, rows = read_csv(out / "streameval.csv")
    assert len(rows) == 2 * 2 and "accuracy, lines back" in capsys.readouterr().out
    assert_png(out / "streameval.png")
