"""The paper's Table 3 for models pre-trained with and without sinks: which sink size each needs.

For each checkpoint (one per pre-training variant), on a held-out text:

* streaming perplexity at a fixed cache L with S = 0, 1, 2, 4 sinks (``S + (L - S)``);
* dense perplexity over several trained lengths, per trained-length segment (past the first,
  the model sees positions it was never trained at);
* attention-sink statistics (:func:`~streamingllm.evals.attention.sink_statistics`), with the
  share a softmax sink takes for the SoftMax1 and sink-logit variants.

A text is tokenized by each checkpoint's own tokenizer: the sink-token variant's prepends its
``<sink>`` (its BOS), which is then the first cached token, the one S = 1 keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checks import ArgumentError, check_int, check_int_list
from ..report import format_table, pyplot, save_figure, write_csv
from .attention import SinkStats, capture, sink_statistics
from .corpus import tokenize_window
from .perplexity import evaluate, make_settings, summarize
from .recall_report import plot_sinks, write_sink_csv

#: The paper's Table 3 (160M models trained from scratch; a 1024-token cache), perplexity by S.
PAPER_TABLE3 = {
    "vanilla": {0: 27.87, 1: 18.49, 4: 18.05},
    "softmax1": {0: 29214.0, 1: 19.90, 4: 18.01},
    "sink-token": {0: 1235.0, 1: 18.01, 4: 18.02},
}


@dataclass(frozen=True)
class EvalPlan:
    """What :func:`evaluate_checkpoints` measures.

    Attributes:
        trained_length: the models' training sample length (tokens).
        cache_size: streaming cache L = S + W (tokens).
        sink_sizes: the S values, each with W = L - S.
        eval_tokens: held-out tokens scored by streaming.
        dense_tokens: held-out tokens scored by dense attention (from the text's start), at most
            ``eval_tokens`` (streaming is compared with dense on the same tokens).
        chunk_size: tokens per forward pass while scoring (results do not depend on it).
        stats_tokens: tokens of each text window the sink statistics use.
        stats_windows: windows, spread evenly over the text's first ``eval_tokens``, the sink
            statistics average over.
        k: how many first tokens count as sinks in the statistics.
    """

    trained_length: int
    cache_size: int
    sink_sizes: tuple[int, ...]
    eval_tokens: int
    dense_tokens: int
    chunk_size: int = 256
    stats_tokens: int = 256
    k: int = 4
    stats_windows: int = 4

    def __post_init__(self):
        check_int("trained_length", self.trained_length, 2)
        check_int("eval_tokens", self.eval_tokens, 2)
        check_int("dense_tokens", self.dense_tokens, 2, self.eval_tokens)  # streaming is compared on them
        check_int("chunk_size", self.chunk_size, 1)
        check_int("stats_tokens", self.stats_tokens, 2)
        sinks = check_int_list("sink_sizes", self.sink_sizes, 0)
        check_int("cache_size", self.cache_size, max(sinks) + 1)
        check_int("k", self.k, 1, self.stats_tokens - 1)
        check_int("stats_windows", self.stats_windows, 1)
        object.__setattr__(self, "sink_sizes", tuple(sinks))

    @classmethod
    def for_trained_length(cls, trained_length: int, *, cache_size: int | None = None,
                           sink_sizes: Sequence[int] = (0, 1, 2, 4), eval_tokens: int = 20000,
                           dense_tokens: int | None = None, chunk_size: int = 256) -> EvalPlan:
        """The paper's proportions: a cache of half the trained length (its 1024 of 2048), dense
        over 4 trained lengths, statistics over one."""
        return cls(trained_length, trained_length // 2 if cache_size is None else cache_size, tuple(sink_sizes),
                   eval_tokens, 4 * trained_length if dense_tokens is None else dense_tokens, chunk_size,
                   stats_tokens=trained_length, k=min(4, trained_length - 1))

    def label(self, s: int) -> str:
        return f"{s}+{self.cache_size - s}"


@dataclass
class VariantScores:
    """One checkpoint's results.

    Attributes:
        variant: its name.
        streaming: perplexity per sink size S (cache ``S + (L - S)``).
        dense: perplexity per segment ``(lo, hi)`` of one trained length each.
        stats: its attention-sink statistics (averaged over the plan's windows).
        by_position: per query-position range ``(lo, hi)``: the mean share of attention on the first
            token and the share a softmax sink took, over layers after the first two, heads and
            windows (see :func:`shares_by_position`).
        streaming_segments: streaming perplexity (the largest S) on the same segments as ``dense``,
            from the same run as ``streaming`` (the texts start alike), so dense past the trained
            length is compared with streaming on exactly the same tokens.
    """

    variant: str
    streaming: dict[int, float]
    dense: dict[tuple[int, int], float]
    stats: SinkStats
    streaming_segments: dict[tuple[int, int], float] = field(default_factory=dict)
    by_position: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)


@dataclass
class SinkPretrainReport:
    """:func:`evaluate_checkpoints`' results, with the plan that produced them."""

    plan: EvalPlan
    rows: list[VariantScores] = field(default_factory=list)

    def table(self) -> str:
        """Streaming perplexity per S, dense inside and past the trained length, and the mean sink
        shares over the layers after the first two."""
        p = self.plan
        header = ["variant"] + [p.label(s) for s in p.sink_sizes] + [
            f"dense <{p.trained_length}", f"dense {p.trained_length}-{p.dense_tokens}",
            f"streaming {p.trained_length}-{p.dense_tokens}", f"first token {_early_late(p)}",
            f"softmax sink {_early_late(p)}"]
        rows = [[r.variant] + [f"{r.streaming[s]:.2f}" for s in p.sink_sizes]
                + [f"{dense_inside(r):.2f}", f"{dense_past(r, p):.2f}", f"{past(r.streaming_segments, p):.2f}",
                   *(" / ".join(f"{r.by_position[g][i]:.3f}" for g in _early_and_late(r)) for i in (0, 1))]
                for r in self.rows]
        return format_table(header, rows)


def _early_and_late(r: VariantScores) -> list[tuple[int, int]]:
    ranges = sorted(r.by_position)
    return [ranges[0], ranges[-1]]


def _early_late(plan: EvalPlan) -> str:
    edges = position_edges(plan.stats_tokens)
    return f"q{edges[0]}-{edges[1] - 1} / q{edges[-2]}-{edges[-1] - 1}"


def deep_mean(per_layer: np.ndarray | None) -> float:
    """Mean over the layers after the first two (where sinks show, paper Fig. 2); all when fewer."""
    if per_layer is None:
        return 0.0
    v = np.asarray(per_layer, dtype=float)
    return float(v[2:].mean() if len(v) > 2 else v.mean())


def dense_inside(r: VariantScores) -> float:
    """Dense perplexity over the first trained length (the segment starting at 0)."""
    return next(v for (lo, _), v in r.dense.items() if lo == 0)


def dense_past(r: VariantScores, plan: EvalPlan) -> float:
    """Dense perplexity over the tokens past the trained length."""
    return past(r.dense, plan)


def past(segments: Mapping[tuple[int, int], float], plan: EvalPlan) -> float:
    """Perplexity over the segments past the trained length: the geometric mean of the segments'
    perplexities weighted by their lengths (NaN when there are none)."""
    rows = [(hi - lo, v) for (lo, hi), v in segments.items() if lo >= plan.trained_length]
    n = sum(w for w, _ in rows)
    return math.exp(sum(w * math.log(v) for w, v in rows) / n) if n else float("nan")


def evaluate_checkpoints(checkpoints: Mapping[str, str | Path], text: str, plan: EvalPlan, *,
                         progress: bool = True, device: str = "cpu") -> SinkPretrainReport:
    """Score every checkpoint on ``text`` as ``plan`` says.

    Args:
        checkpoints: variant name -> checkpoint folder (or any model name :func:`streamingllm.load` takes).
        text: the held-out text.
        plan: what to measure.
        progress: show progress bars.
        device: torch device.
    """
    from ..models import load
    from ..report import progress_bar

    if not checkpoints:
        raise ArgumentError("checkpoints", "must name at least one checkpoint", dict(checkpoints))
    report = SinkPretrainReport(plan)
    for variant, folder in checkpoints.items():
        model, tokenizer = load(str(folder), device=device)

        def bar(setting, total, variant=variant):
            return progress_bar(total, f"{variant} {setting.label}", enabled=progress)

        ids = tokenize_window(tokenizer, text, 0, plan.eval_tokens)
        settings = make_settings(["streaming"], plan.sink_sizes, cache_size=plan.cache_size)
        scores = evaluate(model, ids, settings, chunk_size=plan.chunk_size, progress_factory=bar)
        streaming = {s.setting.sink_size: s.ppl for s in scores}
        widest = max(scores, key=lambda s: s.setting.sink_size)
        dense_ids = tokenize_window(tokenizer, text, 0, plan.dense_tokens)
        dense = evaluate(model, dense_ids, make_settings(["dense"]), chunk_size=plan.chunk_size,
                         progress_factory=bar)
        summary = summarize(dense, len(dense_ids), plan.trained_length)
        segments = {seg: summary.rows[0][f"{seg[0]}-{seg[1]}"] for seg in summary.segments}
        alike = {(lo, hi): widest.ppl_on(np.arange(lo, hi)) for lo, hi in summary.segments}
        lead = ids[:1] if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else []
        stats, by_position = _window_statistics(model, ids, lead, variant, plan)
        report.rows.append(VariantScores(variant, streaming, segments, stats, alike, by_position))
    return report


def position_edges(tokens: int) -> list[int]:
    """Query-position ranges for :func:`shares_by_position`: 1-15, 16-63, 64 to half the window, the rest."""
    return sorted({e for e in (1, 16, 64, tokens // 2, tokens) if 1 <= e <= tokens})


def shares_by_position(attentions, edges: Sequence[int]) -> dict[tuple[int, int], tuple[float, float]]:
    """Per query range ``[lo, hi)`` of ``edges``: (share on the first token, share a softmax sink took),
    averaged over the layers after the first two (all when fewer), heads and queries. A sink that
    only short contexts use shows as a large first range and small later ones."""
    layers = attentions[2:] if len(attentions) > 2 else attentions
    out = {}
    for lo, hi in zip(edges, edges[1:]):
        first = float(np.mean([float(a[:, lo:hi, 0].mean()) for a in layers]))
        virtual = float(np.mean([float(1.0 - a[:, lo:hi].sum(-1).mean()) for a in layers]))
        out[(lo, hi)] = (first, max(virtual, 0.0))
    return out


def uniform_share(lo: int, hi: int) -> float:
    """The first token's share under uniform causal attention, averaged over queries ``lo..hi-1``."""
    return float(np.mean(1.0 / (np.arange(lo, hi) + 1.0)))


def _window_statistics(model, ids: Sequence[int], lead: Sequence[int], label: str, plan: EvalPlan):
    """Sink statistics and shares by position, averaged over ``plan.stats_windows`` windows of ``ids``
    spread evenly over it; each window starts with ``lead`` (a sink-token checkpoint's ``<sink>``,
    as the model reads every text)."""
    n, lead = plan.stats_tokens, list(lead)
    body = list(ids[len(lead):])
    room = max(0, len(body) - (n - len(lead)))
    starts = sorted({round(i * room / max(1, plan.stats_windows - 1)) for i in range(plan.stats_windows)})
    edges = position_edges(n)
    stats, positions = [], []
    for start in starts:
        attentions = capture(model, lead + body[start:start + n - len(lead)])
        stats.append(sink_statistics(attentions, k=plan.k, label=label))
        positions.append(shares_by_position(attentions, edges))
    mean = SinkStats(label, plan.k, np.mean([s.sink_share for s in stats], 0), np.mean([s.first_share for s in stats], 0),
                     float(np.mean([s.uniform_first for s in stats])), n,
                     np.mean([s.softmax_sink_share for s in stats], 0))
    return mean, {r: tuple(np.mean([p[r] for p in positions], 0).tolist()) for r in positions[0]}


def write_report(report: SinkPretrainReport, out: Path) -> list[Path]:
    """``table3.csv`` and ``table3.md`` (beside the paper's), ``dense.csv`` and ``dense.png``,
    ``sinks.csv`` and ``sinks.png`` in ``out``."""
    out = Path(out)
    p = report.plan
    table_rows = [{"variant": r.variant, **{p.label(s): r.streaming[s] for s in p.sink_sizes},
                   "dense_inside": dense_inside(r), "dense_past": dense_past(r, p),
                   "streaming_past": past(r.streaming_segments, p),
                   "first_token_share": deep_mean(r.stats.first_share),
                   "softmax_sink_share": deep_mean(r.stats.softmax_sink_share)} for r in report.rows]
    columns = ["variant", *(p.label(s) for s in p.sink_sizes), "dense_inside", "dense_past", "streaming_past",
               "first_token_share",
               "softmax_sink_share"]
    written = [write_csv(table_rows, out / "table3.csv", columns)]
    (out / "table3.md").write_text(markdown_table(report) + "\n")
    written.append(out / "table3.md")
    dense_rows = [{"variant": r.variant, "from_token": lo, "to_token": hi, "dense_ppl": v,
                   "streaming_ppl": r.streaming_segments.get((lo, hi))}
                  for r in report.rows for (lo, hi), v in r.dense.items()]
    written.append(write_csv(dense_rows, out / "dense.csv",
                             ["variant", "from_token", "to_token", "dense_ppl", "streaming_ppl"]))
    written.append(plot_dense(report, out / "dense.png"))
    stats = [r.stats for r in report.rows]
    written.append(write_sink_csv(stats, out / "sinks.csv"))
    position_rows = [{"variant": r.variant, "from_query": lo, "to_query": hi, "first_token_share": first,
                      "softmax_sink_share": virtual, "uniform_first_token_share": uniform_share(lo, hi)}
                     for r in report.rows for (lo, hi), (first, virtual) in sorted(r.by_position.items())]
    written.append(write_csv(position_rows, out / "sinks_by_position.csv",
                             ["variant", "from_query", "to_query", "first_token_share", "softmax_sink_share",
                              "uniform_first_token_share"]))
    written.append(plot_by_position(report, out / "sinks_by_position.png"))
    written.append(plot_sinks(stats, out / "sinks.png", title=f"attention sinks of the pre-trained variants "
                              f"({stats[0].tokens} held-out tokens)"))
    return written


def plot_by_position(report: SinkPretrainReport, path) -> Path:
    """The share of attention on the first token (solid) and taken by a softmax sink (dashed) per
    query-position range, per variant."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for r in report.rows:
        ranges = sorted(r.by_position)
        x = np.arange(len(ranges))
        line, = ax.plot(x, [r.by_position[g][0] for g in ranges], "o-", ms=4, label=f"{r.variant}: first token")
        if any(r.by_position[g][1] > 1e-3 for g in ranges):
            ax.plot(x, [r.by_position[g][1] for g in ranges], "x--", ms=4, color=line.get_color(),
                    label=f"{r.variant}: softmax sink")
    ranges = sorted(report.rows[0].by_position)
    ax.plot(np.arange(len(ranges)), [uniform_share(lo, hi) for lo, hi in ranges], ":", color="grey",
            label="uniform attention: first token")
    ax.set_xticks(np.arange(len(ranges)), [f"{lo}-{hi - 1}" for lo, hi in ranges])
    ax.set(xlabel="query position", ylabel="share of attention (layers 2+)", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, title=f"where the sinks are used ({report.plan.stats_windows} windows of "
                       f"{report.plan.stats_tokens} held-out tokens)")


def markdown_table(report: SinkPretrainReport) -> str:
    """Our perplexities per S beside the paper's Table 3 (a Markdown table)."""
    p = report.plan
    header = ["variant", *(p.label(s) for s in p.sink_sizes), "paper, 160M: 0+1024 / 1+1023 / 4+1020"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in report.rows:
        paper = PAPER_TABLE3.get(r.variant)
        ref = " / ".join(f"{paper[s]:g}" for s in (0, 1, 4)) if paper else "(not in the paper)"
        lines.append("| " + " | ".join([r.variant, *(f"{r.streaming[s]:.2f}" for s in p.sink_sizes), ref]) + " |")
    return "\n".join(lines)


def plot_dense(report: SinkPretrainReport, path) -> Path:
    """Dense perplexity per trained-length segment, per variant, beside streaming (the largest S) on
    the same tokens (dashed), with the trained length marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    s = max(report.plan.sink_sizes)
    for r in report.rows:
        segs = sorted(r.dense)
        line, = ax.plot([hi for _, hi in segs], [r.dense[g] for g in segs], "o-", ms=4, label=f"{r.variant} dense")
        if r.streaming_segments:
            ax.plot([hi for _, hi in segs], [r.streaming_segments[g] for g in segs], "x--", ms=4,
                    color=line.get_color(), label=f"{r.variant} streaming {report.plan.label(s)}")
    ax.axvline(report.plan.trained_length, ls=":", color="grey", lw=1)
    ax.set(xlabel="tokens into the text (segment end)", ylabel="dense perplexity of the segment", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path, title=f"dense attention past the trained length ({report.plan.trained_length}, dotted)")
