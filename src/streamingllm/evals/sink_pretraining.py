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
from .recall_report import plot_sinks, sink_table, write_sink_csv

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
        dense_tokens: held-out tokens scored by dense attention (from the text's start).
        chunk_size: tokens per forward pass while scoring (results do not depend on it).
        stats_tokens: tokens of the text the sink statistics use.
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

    def __post_init__(self):
        check_int("trained_length", self.trained_length, 2)
        check_int("eval_tokens", self.eval_tokens, 2)
        check_int("dense_tokens", self.dense_tokens, 2)
        check_int("chunk_size", self.chunk_size, 1)
        check_int("stats_tokens", self.stats_tokens, 2)
        sinks = check_int_list("sink_sizes", self.sink_sizes, 0)
        check_int("cache_size", self.cache_size, max(sinks) + 1)
        check_int("k", self.k, 1, self.stats_tokens - 1)
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
        stats: its attention-sink statistics.
    """

    variant: str
    streaming: dict[int, float]
    dense: dict[tuple[int, int], float]
    stats: SinkStats


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
            "first-token share", "softmax-sink share"]
        rows = [[r.variant] + [f"{r.streaming[s]:.2f}" for s in p.sink_sizes]
                + [f"{dense_inside(r, p):.2f}", f"{dense_past(r, p):.2f}",
                   f"{deep_mean(r.stats.first_share):.3f}", f"{deep_mean(r.stats.softmax_sink_share):.3f}"]
                for r in self.rows]
        return format_table(header, rows)


def deep_mean(per_layer: np.ndarray | None) -> float:
    """Mean over the layers after the first two (where sinks show, paper Fig. 2); all when fewer."""
    if per_layer is None:
        return 0.0
    v = np.asarray(per_layer, dtype=float)
    return float(v[2:].mean() if len(v) > 2 else v.mean())


def dense_inside(r: VariantScores, plan: EvalPlan) -> float:
    """Dense perplexity over the first trained length (the segment starting at 0)."""
    return next(v for (lo, _), v in r.dense.items() if lo == 0)


def dense_past(r: VariantScores, plan: EvalPlan) -> float:
    """Dense perplexity over the tokens past the trained length (geometric mean of the segments'
    perplexities weighted by their lengths)."""
    past = [(hi - lo, v) for (lo, hi), v in r.dense.items() if lo >= plan.trained_length]
    n = sum(w for w, _ in past)
    return math.exp(sum(w * math.log(v) for w, v in past) / n) if n else float("nan")


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

    report = SinkPretrainReport(plan)
    for variant, folder in checkpoints.items():
        model, tokenizer = load(str(folder), device=device)

        def bar(setting, total, variant=variant):
            return progress_bar(total, f"{variant} {setting.label}", enabled=progress)

        ids = tokenize_window(tokenizer, text, 0, plan.eval_tokens)
        settings = make_settings(["streaming"], plan.sink_sizes, cache_size=plan.cache_size)
        scores = evaluate(model, ids, settings, chunk_size=plan.chunk_size, progress_factory=bar)
        streaming = {s.setting.sink_size: s.ppl for s in scores}
        dense_ids = tokenize_window(tokenizer, text, 0, plan.dense_tokens)
        dense = evaluate(model, dense_ids, make_settings(["dense"]), chunk_size=plan.chunk_size,
                         progress_factory=bar)
        summary = summarize(dense, len(dense_ids), plan.trained_length)
        segments = {seg: summary.rows[0][f"{seg[0]}-{seg[1]}"] for seg in summary.segments}
        stats_ids = tokenize_window(tokenizer, text, 0, plan.stats_tokens)
        stats = sink_statistics(capture(model, stats_ids), k=plan.k, label=variant)
        report.rows.append(VariantScores(variant, streaming, segments, stats))
    if not report.rows:
        raise ArgumentError("checkpoints", "must name at least one checkpoint", dict(checkpoints))
    return report


def write_report(report: SinkPretrainReport, out: Path) -> list[Path]:
    """``table3.csv`` and ``table3.md`` (beside the paper's), ``dense.csv`` and ``dense.png``,
    ``sinks.csv`` and ``sinks.png`` in ``out``."""
    out = Path(out)
    p = report.plan
    table_rows = [{"variant": r.variant, **{p.label(s): r.streaming[s] for s in p.sink_sizes},
                   "dense_inside": dense_inside(r, p), "dense_past": dense_past(r, p),
                   "first_token_share": deep_mean(r.stats.first_share),
                   "softmax_sink_share": deep_mean(r.stats.softmax_sink_share)} for r in report.rows]
    columns = ["variant", *(p.label(s) for s in p.sink_sizes), "dense_inside", "dense_past", "first_token_share",
               "softmax_sink_share"]
    written = [write_csv(table_rows, out / "table3.csv", columns)]
    (out / "table3.md").write_text(markdown_table(report) + "\n")
    written.append(out / "table3.md")
    dense_rows = [{"variant": r.variant, "from_token": lo, "to_token": hi, "ppl": v}
                  for r in report.rows for (lo, hi), v in r.dense.items()]
    written.append(write_csv(dense_rows, out / "dense.csv", ["variant", "from_token", "to_token", "ppl"]))
    written.append(plot_dense(report, out / "dense.png"))
    stats = [r.stats for r in report.rows]
    written.append(write_sink_csv(stats, out / "sinks.csv"))
    written.append(plot_sinks(stats, out / "sinks.png", title=f"attention sinks of the pre-trained variants "
                              f"({stats[0].tokens} held-out tokens)"))
    return written


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
    """Dense perplexity per trained-length segment, per variant, with the trained length marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for r in report.rows:
        segs = sorted(r.dense)
        ax.plot([hi for _, hi in segs], [r.dense[s] for s in segs], "o-", ms=4, label=r.variant)
    ax.axvline(report.plan.trained_length, ls=":", color="grey", lw=1)
    ax.set(xlabel="tokens into the text (segment end)", ylabel="dense perplexity of the segment", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, title=f"dense attention past the trained length ({report.plan.trained_length}, dotted)")
