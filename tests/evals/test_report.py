"""Reports of the perplexity evaluation: like-for-like legend labels, the summary table, figures."""

from __future__ import annotations

import numpy as np
import pytest

from streamingllm import BlockMemory
from streamingllm.checks import ArgumentError
from streamingllm.evals.perplexity import Scores, Setting, summarize
from streamingllm.evals.report import (
    curve_labels,
    format_summary,
    ordinal,
    plot_curves,
    plot_sweep,
    read_nll_csv,
    smoothing_points,
    write_nll_csv,
    write_summary_csv,
)


def scores(setting: Setting, nll: np.ndarray, every: int = 1) -> Scores:
    tokens = np.arange(every, len(nll) * every + 1, every)[: len(nll)]
    return Scores(setting, tokens, nll, seconds=1.0, every=every)


@pytest.fixture
def results() -> list[Scores]:
    """Streaming with NLL 1 on odd tokens and 3 on even ones; recompute scored every 2nd token."""
    n = 100
    stream = np.where(np.arange(1, n) % 2, 1.0, 3.0)
    rec = scores(Setting("recompute", 0, 64), np.full(49, 2.0), every=2)
    return [scores(Setting("streaming", 4, 60), stream), rec]


def test_ordinal():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"]


def test_legend_compares_like_for_like_when_recompute_is_subsampled(results):
    labels = curve_labels(results, smooth=64)
    # recompute scored the even tokens only, where streaming's NLL is 3
    assert results[0].ppl == pytest.approx(np.exp((50 * 1.0 + 49 * 3.0) / 99))
    assert labels[0] == f"streaming 4+60: ppl {results[0].ppl:.2f} all, {np.exp(3.0):.2f} on recompute's 49 tokens"
    assert labels[1] == (f"recompute 64: ppl {np.exp(2.0):.2f} on recompute's 49 tokens "
                         "(every 2nd token; moving mean over 32 scored tokens)")
    assert "mean of" not in " ".join(labels)


def test_legend_without_subsampling(results):
    full = scores(Setting("recompute", 0, 64), np.full(99, 2.0))
    labels = curve_labels([results[0], full, scores(Setting("dense"), np.zeros(99))])
    assert labels == [f"streaming 4+60: ppl {results[0].ppl:.2f}", f"recompute 64: ppl {np.exp(2.0):.2f}", "dense: ppl 1.00"]


def test_smoothing_points():
    r = scores(Setting("recompute", 0, 8), np.ones(10), every=8)
    assert smoothing_points(r, 256) == 32 and smoothing_points(r, 64) == 16
    assert smoothing_points(scores(Setting("dense"), np.ones(10)), 100) == 100


def test_summary_table_and_csv(results, tmp_path):
    summary = summarize(results, 100, segment_tokens=50)
    table = format_summary(summary)
    lines = table.splitlines()
    assert lines[0].split() == ["label", "scored", "ppl", "0-50", "50-100", "@recompute", "tok/s"]
    assert lines[2].split()[:3] == ["streaming", "4+60", "99"]
    assert f"{np.exp(3.0):.2f}" in lines[2]  # @recompute: streaming on the even tokens
    assert lines[-1].startswith("note: recompute 64 scored every 2nd token only (49 tokens)")
    path = write_summary_csv(summary, tmp_path / "sub" / "summary.csv")
    header, first = path.read_text().splitlines()[:2]
    assert header == "label,scored,ppl,0-50,50-100,@recompute,tok/s" and first.startswith("streaming 4+60,99,")


def test_nll_csv_round_trip_keeps_large_nll_exact(tmp_path):
    r = scores(Setting("streaming", 4, 12, (5,) * 4, '"\\n"'), np.array([12.3456789, 0.000123456, 30.5]))
    back = read_nll_csv(write_nll_csv([r], tmp_path / "nll.csv"))
    assert back[0].setting.label == r.setting.label and np.abs(back[0].nll - r.nll).max() < 1e-6


@pytest.mark.parametrize("memory", [BlockMemory(), BlockMemory(block_size=32, top_k=2, lookup_every=4),
                                    BlockMemory(block_size=2, top_k=1, repr_keys=2)])
def test_nll_csv_round_trip_keeps_the_memory_settings_its_label_names(tmp_path, memory):
    r = scores(Setting("memory", 4, 12, memory=memory), np.array([1.5, 2.5]))
    back = read_nll_csv(write_nll_csv([r], tmp_path / "nll.csv"))[0].setting
    assert back.label == r.setting.label and back.method == "memory"
    assert (back.memory.top_k, back.memory.block_size, back.memory.lookup_every) == (
        memory.top_k, memory.block_size, memory.lookup_every)


def test_a_memory_label_that_names_no_settings_is_refused():
    with pytest.raises(ArgumentError, match="label"):
        BlockMemory.from_label("k4by128")


def test_figures_are_written(results, tmp_path):
    assert plot_curves(results, tmp_path / "a" / "curves.png", smooth=16, trained_length=50, title="t") == tmp_path / "a" / "curves.png"
    assert (tmp_path / "a" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    sweep = results + [scores(Setting("streaming", 4, 28), np.ones(99))]
    assert plot_sweep(sweep, tmp_path / "sweep.png") is True and (tmp_path / "sweep.png").stat().st_size > 10_000


def test_a_subsampled_runs_thin_segments_are_marked(results):
    """Recompute scored 24-25 tokens per segment here: its segment cells carry '*' and a note says
    why; streaming's, on every token, do not."""
    lines = format_summary(summarize(results, 100, segment_tokens=50)).splitlines()
    streaming, recompute = lines[2].split(), lines[3].split()
    assert not any(cell.endswith("*") for cell in streaming)
    assert [cell for cell in recompute if cell.endswith("*")] == [f"{np.exp(2.0):.2f}*"] * 2
    assert lines[-2].startswith("* recompute 64: 24-25 scored tokens per segment, too few")
    full = [results[0], scores(Setting("recompute", 0, 64), np.full(99, 2.0))]
    assert "*" not in format_summary(summarize(full, 100, segment_tokens=50))


def test_dense_is_drawn_dashed_on_top(results, monkeypatch, tmp_path):
    """Where streaming equals dense (text inside the cache) the dense curve stays visible."""
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        drawn.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    dense = scores(Setting("dense"), np.ones(99))
    plot_curves([results[0], dense], tmp_path / "curves.png", smooth=8)
    assert drawn[1]["ls"] == "--" and drawn[1]["zorder"] > drawn[0].get("zorder", 2)


def test_sink_shares_use_one_set_of_queries():
    """The share on the first token never exceeds the share on the first k tokens: both are over
    the queries at positions >= k (early queries attend to token 0 by necessity)."""
    import torch

    from streamingllm.evals.attention import sink_statistics
    from streamingllm.evals.recall_report import sink_table

    T = 12
    a = torch.tril(torch.ones(T, T))
    a[4:, 0] = 0.0  # later queries spread over tokens 1.. and never look at token 0
    a = (a / a.sum(-1, keepdim=True))[None]  # (heads, queries, keys)
    stats = sink_statistics([a], k=4, label="m")
    assert stats.first_share[0] == 0.0 <= stats.sink_share[0]
    assert stats.uniform_first == pytest.approx(np.mean(1.0 / np.arange(5, T + 1)))
    assert "first 4 / first 1 (queries >= 4)" in sink_table([stats])


def test_attention_maps_have_colour_bars(tmp_path, monkeypatch):
    import matplotlib.figure

    from streamingllm.evals.recall_report import plot_maps

    bars = []
    original = matplotlib.figure.Figure.colorbar
    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar",
                        lambda self, *a, **k: bars.append(1) or original(self, *a, **k))
    maps = np.random.default_rng(0).random((3, 5, 5))
    plot_maps(maps, list("abcde"), tmp_path / "maps.png", [0, 2])
    assert len(bars) == 2 and (tmp_path / "maps.png").stat().st_size > 0
