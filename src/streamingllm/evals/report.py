"""Reports of the perplexity evaluation: the summary table, CSV files and the two figures.

* :func:`format_summary` / :func:`write_summary_csv` -- perplexity per setting (a :class:`Summary`);
* :func:`write_nll_csv` / :func:`read_nll_csv` -- every scored token's NLL, and back (to re-plot);
* :func:`plot_curves` -- the paper's Figure 3, log perplexity along the text, with the legend
  labels of :func:`curve_labels`; :func:`plot_sweep` -- perplexity against the swept cache size
  or sink count (Tables 2 and 6).

Figures need matplotlib (the ``plots`` extra).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..cache import BlockMemory
from ..report import format_table, format_value, pyplot, save_figure, write_csv
from .perplexity import Scores, Setting, Summary, subsampled

CSV_FIELDS = ("label", "method", "sink_size", "window_size", "token", "nll")


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..., ``11th``, ``12th``, ``13th``, ``21st``, ..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


#: Fewer scored tokens than this in a segment make a subsampled run's per-segment perplexity too
#: noisy to read: the table marks it with ``*``.
FEW_SEGMENT_TOKENS = 100


def format_summary(summary: Summary) -> str:
    """The summary as an aligned text table (perplexities; higher is worse), with a note on the
    ``@recompute`` column when recompute was subsampled, and ``*`` on its per-segment cells that
    rest on fewer than :data:`FEW_SEGMENT_TOKENS` scored tokens."""
    if not summary.rows:
        return "(no results)"
    cols = list(summary.rows[0])
    cells = [[f"{row[c]:,}" if c == "scored" else format_value(row[c], 2) for c in cols] for row in summary.rows]
    few = _few_tokens_per_segment(summary)
    for row, line in zip(summary.rows, cells):
        if few and summary.subsampled is not None and row["label"] == summary.subsampled.setting.label:
            for name in few:
                line[cols.index(name)] += "*"
    out = format_table(cols, cells)
    if few:
        counts = sorted(few.values())
        out += (f"\n* {summary.subsampled.setting.label}: {counts[0]}-{counts[-1]} scored tokens per segment, too few "
                "for a per-segment perplexity (compare its overall ppl and '@recompute')")
    if summary.subsampled is not None:
        s = summary.subsampled
        out += (f"\nnote: {s.setting.label} scored every {ordinal(s.every)} token only ({len(s.nll):,} tokens); "
                "'@recompute' gives every method's perplexity on exactly those tokens")
    return out


def _few_tokens_per_segment(summary: Summary) -> dict[str, int]:
    """``{column: scored tokens}`` of the segments where the subsampled run scored too few tokens."""
    s = summary.subsampled
    if s is None:
        return {}
    counts = {f"{lo}-{hi}": int(((s.tokens >= lo) & (s.tokens < hi)).sum()) for lo, hi in summary.segments}
    return {name: n for name, n in counts.items() if n < FEW_SEGMENT_TOKENS}


def write_summary_csv(summary: Summary, path: str | Path) -> Path:
    """The summary's rows as CSV (one column per key of a row); returns the path."""
    return write_csv(summary.rows, path, list(summary.rows[0]) if summary.rows else ["label"])


def write_nll_csv(results: Sequence[Scores], path: str | Path) -> Path:
    """One row per scored token: label, method, S, W (empty for dense), token index, NLL (nats)."""
    rows = [
        {"label": r.setting.label, "method": r.setting.method, "sink_size": r.setting.sink_size,
         "window_size": r.setting.window_size, "token": int(t), "nll": float(x)}
        for r in results for t, x in zip(r.tokens, r.nll)
    ]
    return write_csv(rows, path, CSV_FIELDS, digits=9)


def read_nll_csv(path: str | Path) -> list[Scores]:
    """The results in a CSV written by :func:`write_nll_csv`, in file order (e.g. to re-plot them).

    Timings are not stored (``seconds`` is 0); a ``recompute`` run's subsampling step is
    recovered from its token spacing.
    """
    rows: dict[str, tuple[dict, list, list]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise ValueError(f"{path}: expected columns {CSV_FIELDS}, got {reader.fieldnames}")
        for row in reader:
            _, toks, nll = rows.setdefault(row["label"], (row, [], []))
            toks.append(int(row["token"]))
            nll.append(float(row["nll"]))
    out = []
    for label, (row, toks, nll) in rows.items():
        method, sinks = row["method"], int(row["sink_size"])
        window = int(row["window_size"]) if row["window_size"] else None
        name = label.split(" ", 1)[1][len(str(sinks)) : -len(f"+{window}")] if method == "streaming" else ""
        memory = BlockMemory.from_label(label.rsplit(" ", 1)[1]) if method == "memory" else None
        setting = Setting(method, sinks, window, (0,) * sinks if name else None, name or None, memory)
        tokens = np.array(toks)
        every = int(tokens[1] - tokens[0]) if method == "recompute" and len(tokens) > 1 else 1
        out.append(Scores(setting, tokens, np.array(nll), 0.0, every))
    return out


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def _moving_mean(x: np.ndarray, n: int) -> np.ndarray:
    """Mean of the last ``n`` values at each point (fewer at the start)."""
    c = np.concatenate(([0.0], np.cumsum(x)))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - n)
    return (c[i] - c[lo]) / (i - lo)


def smoothing_points(result: Scores, smooth: int) -> int:
    """Scored tokens in the moving mean of ``result``'s curve: ``smooth`` for runs that scored every
    token; a subsampled run averages as many of its points as span ``smooth`` tokens, at least 16."""
    return smooth if result.every == 1 else max(16, smooth // result.every)


def curve_labels(results: Sequence[Scores], smooth: int = 256) -> list[str]:
    """The legend label of each result in :func:`plot_curves`, perplexities like for like.

    Without subsampling: ``"streaming 4+1020: ppl 12.31"``. When ``recompute`` scored every k-th
    token only, every other label also gives the perplexity on exactly those tokens
    (``"streaming 4+1020: ppl 12.31 all, 12.90 on recompute's 256 tokens"``) and the recompute
    run shows only that figure, with its step and the points its moving mean covers.
    """
    sub = subsampled(results)
    labels = []
    for r in results:
        label = f"{r.setting.label}: ppl"
        if sub is None:
            labels.append(f"{label} {r.ppl:.2f}")
            continue
        on_sub = f"{r.ppl_on(sub.tokens):.2f} on recompute's {len(sub.tokens):,} tokens"
        if r.every > 1:
            labels.append(f"{label} {on_sub} (every {ordinal(r.every)} token; moving mean over "
                          f"{smoothing_points(r, smooth)} scored tokens)")
        else:
            labels.append(f"{label} {r.ppl:.2f} all, {on_sub}")
    return labels


def plot_curves(
    results: Sequence[Scores],
    path: str | Path,
    smooth: int = 256,
    trained_length: int | None = None,
    title: str = "",
) -> Path:
    """The paper's Figure 3: log perplexity (moving mean NLL over ``smooth`` tokens) vs token.

    Args:
        results: from :func:`~streamingllm.evals.perplexity.evaluate` or :func:`read_nll_csv`.
        path: the PNG to write (folders are created).
        smooth: tokens of the moving mean (see :func:`smoothing_points` for subsampled runs).
        trained_length: marks the model's trained length, when the text is longer.
        title: the figure's title (default ``"Streaming perplexity"``).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2 + 0.17 * len(results)))
    settled = []
    for r, label in zip(results, curve_labels(results, smooth)):
        if not len(r.nll):
            continue
        n = smoothing_points(r, smooth)
        curve = _moving_mean(r.nll, n)
        style = dict(marker=".", ms=3, lw=1) if r.every > 1 else dict(lw=1.2)
        if r.setting.method == "dense":  # dashed and on top: where streaming equals it, both stay visible
            style.update(ls="--", zorder=3)
        ax.plot(r.tokens, curve, label=label, **style)
        settled.append(curve[n:])
    settled = [x for x in settled if len(x)]
    if settled:  # the first tokens' high loss would squash the curves; keep them, off the scale
        ax.set_ylim(0, 1.15 * max(float(x.max()) for x in settled))
    last = max((int(r.tokens[-1]) for r in results if len(r.tokens)), default=0)
    if trained_length and trained_length < last:
        ax.axvline(trained_length, color="gray", ls="--", lw=1)
        ax.text(trained_length, ax.get_ylim()[0], " trained length", va="bottom", ha="left", color="gray", fontsize=8)
    ax.set_xlabel("token in the stream")
    ax.set_ylabel(f"log perplexity\n(moving mean of NLL over {smooth} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.13), frameon=False)  # below: the curves fill the axes
    return save_figure(fig, path, title or "Streaming perplexity")


def plot_sweep(results: Sequence[Scores], path: str | Path, title: str = "") -> bool:
    """Perplexity against the swept cache parameter; returns False (no file) if nothing was swept.

    Several cache sizes: perplexity vs cache size, one line per method and sink count (Table 6).
    One cache size, several sink counts: perplexity vs number of sinks (Table 2). When recompute
    scored every k-th token only, every point is the perplexity on the tokens it scored (like
    for like, as the y axis says; the summary table has the full-text figures too).
    """
    plt = pyplot()
    import matplotlib.ticker

    cached = [r for r in results if r.setting.cache_size is not None]
    sizes = sorted({r.setting.cache_size for r in cached})
    sinks = sorted({r.setting.sink_size for r in cached if r.setting.method == "streaming"})
    if len(sizes) < 2 and len(sinks) < 2:
        return False
    sub = subsampled(results)
    ppl = (lambda r: r.ppl_on(sub.tokens)) if sub is not None else (lambda r: r.ppl)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(sizes) >= 2:
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in cached:
            s = r.setting
            name = f"streaming S={s.sink_size}" if s.method == "streaming" else s.method
            lines.setdefault(name, []).append((s.cache_size, ppl(r)))
        for name, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("cache size S + W (tokens)")
    else:
        pts = sorted((r.setting.sink_size, ppl(r)) for r in cached if r.setting.method == "streaming")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"streaming, cache {sizes[0]}")
        for r in cached:
            if r.setting.method == "recompute":
                ax.axhline(ppl(r), color="gray", ls="--", lw=1, label=r.setting.label)
        ax.set_xticks(sinks)
        ax.set_xlabel("attention sinks S (W = cache - S)")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("perplexity" if sub is None else
                  f"perplexity on recompute's {len(sub.tokens):,} tokens\n(every {ordinal(sub.every)} token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path, title or "Perplexity sweep")
    return True
