"""Tables, CSV files and figures of the attention, StreamEval and passkey evaluations."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..report import format_table, pyplot, save_figure, write_csv
from .attention import SinkStats
from .passkey import PasskeyResult
from .streameval import StreamEvalResult

# --- attention ---------------------------------------------------------------------------------


def plot_maps(maps: np.ndarray, tokens: Sequence[str], path, layers: Sequence[int] | None = None,
              title: str = "", panel: str = "layer") -> Path:
    """The paper's Figure 2: one panel per layer of head-averaged attention (rows: queries, columns:
    keys), each with a colour bar of its own scale (attention weight, 0 to the panel's largest);
    ``panel`` names what the panels are (``"head"`` for one layer's heads)."""
    plt = pyplot()
    layers = list(range(len(maps))) if layers is None else list(layers)
    cols = min(4, len(layers))
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    n = len(tokens)
    for ax, layer in zip(axes.flat, layers):
        m = np.where(np.tril(np.ones((n, n), dtype=bool)), maps[layer][:n, :n], np.nan)
        image = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=float(np.nanmax(m)) or 1.0)
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=5)
        ax.set_title(f"{panel} {layer}", fontsize=8)
        ax.set_xticks(range(n))
        ax.set_xticklabels(tokens, rotation=90, fontsize=5)
        ax.set_yticks(range(n))
        ax.set_yticklabels(tokens, fontsize=5)
    return save_figure(fig, path, title)


def sink_rows(stats: Sequence[SinkStats]) -> list[dict]:
    return [{"model": s.label, "layer": layer, "k": s.k, "sink_share": float(s.sink_share[layer]),
             "first_token_share": float(s.first_share[layer]), "uniform_first_token_share": s.uniform_first,
             "softmax_sink_share": _virtual(s)[layer], "tokens": s.tokens,
             "layer_type": s.layer_types[layer] if s.layer_types else ""}
            for s in stats for layer in range(len(s.sink_share))]


def _virtual(s: SinkStats) -> np.ndarray:
    return np.zeros(len(s.sink_share)) if s.softmax_sink_share is None else s.softmax_sink_share


def _has_softmax_sink(s: SinkStats) -> bool:
    return bool((_virtual(s) > 1e-3).any())


def write_sink_csv(stats: Sequence[SinkStats], path) -> Path:
    return write_csv(sink_rows(stats), path, ["model", "layer", "k", "sink_share", "first_token_share",
                                               "uniform_first_token_share", "softmax_sink_share", "tokens",
                                               "layer_type"])


def sink_table(stats: Sequence[SinkStats]) -> str:
    """Per layer and model: the share on the first k tokens / on the first token, and, for models
    whose softmax has a sink of its own, the share it took (a third number); all over the queries
    at positions >= k, as the header says."""
    header = ["layer"] + [f"{s.label}: first {s.k} / first 1" + (" / softmax sink" if _has_softmax_sink(s) else "")
                          + f" (queries >= {s.k})" for s in stats]
    typed = any(s.layer_types for s in stats)
    layers = max(len(s.sink_share) for s in stats)

    def cell(s, layer):
        if layer >= len(s.sink_share):
            return ""
        extra = f" / {_virtual(s)[layer]:.3f}" if _has_softmax_sink(s) else ""
        kind = f" ({_short(s.layer_types[layer])})" if s.layer_types else ""
        return f"{s.sink_share[layer]:.3f} / {s.first_share[layer]:.3f}{extra}{kind}"

    rows = [[str(layer)] + [cell(s, layer) for s in stats] for layer in range(layers)]
    if typed:  # the mean per layer type (hybrid models)
        kinds = list(dict.fromkeys(t for s in stats for t in (s.layer_types or ())))
        for kind in kinds:
            rows.append([f"{_short(kind)} layers"] + [_type_cell(s, kind) for s in stats])
    rows.append(["uniform"] + [f"- / {s.uniform_first:.3f}" for s in stats])
    return format_table(header, rows)


def _short(layer_type: str) -> str:
    return layer_type.replace("_attention", "")


def _type_cell(s: SinkStats, kind: str) -> str:
    row = s.by_type().get(kind) if s.layer_types else None
    return "" if row is None else f"{row['sink_share']:.3f} / {row['first_share']:.3f} (mean of {row['layers']})"


def plot_sinks(stats: Sequence[SinkStats], path, title: str = "") -> Path:
    """Per layer: the share of attention on the first k tokens and on the first token, per model,
    with uniform attention's first-token share as a dotted line."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for s in stats:
        x = np.arange(len(s.sink_share))
        a.plot(x, s.sink_share, "o-", ms=3, label=s.label)
        line = b.plot(x, s.first_share, "o-", ms=3, label=s.label)[0]
        if s.layer_types:  # hybrid: ring the global layers
            full = np.array([t == "full_attention" for t in s.layer_types])
            for ax, y in ((a, s.sink_share), (b, s.first_share)):
                ax.plot(x[full], y[full], "o", ms=9, mfc="none", color=line.get_color(), label=None)
            a.plot([], [], "o", ms=9, mfc="none", color=line.get_color(), label=f"{s.label}: global layers")
        b.axhline(s.uniform_first, ls=":", color=line.get_color(), lw=1)
        if _has_softmax_sink(s):
            a.plot(x, _virtual(s), "x--", ms=4, color=line.get_color(), lw=1, label=f"{s.label}: softmax sink")
    a.set(xlabel="layer", ylabel=f"attention on the first {stats[0].k} tokens", ylim=(0, 1.02),
          title="sink share (mean over heads and queries)")
    b.set(xlabel="layer", ylabel="attention on the first token", ylim=(0, 1.02),
          title="first token (dotted: uniform attention)")
    a.legend(fontsize=7)
    return save_figure(fig, path, title)


# --- passkey -----------------------------------------------------------------------------------


def passkey_rows(results: Sequence[PasskeyResult]) -> list[dict]:
    return [{"label": r.label, "cache_size": r.cache_size, "view": r.view, "depth": r.depth,
             "key_distance": r.key_distance, "in_window": r.in_window,
             "correct": "" if r.correct is None else int(r.correct), "answer": r.answer} for r in results]


def write_passkey_csv(results: Sequence[PasskeyResult], path) -> Path:
    return write_csv(passkey_rows(results), path, ["label", "cache_size", "view", "depth", "key_distance",
                                                   "in_window", "correct", "answer"])


def _accuracy(results, key) -> dict:
    """label -> {key value: accuracy} over the results with an outcome."""
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.correct is not None:
            acc[r.label][key(r)].append(r.correct)
    return {label: {k: float(np.mean(v)) for k, v in sorted(by.items())} for label, by in acc.items()}


def passkey_table(results: Sequence[PasskeyResult]) -> str:
    acc = _accuracy(results, lambda r: r.depth)
    depths = sorted({r.depth for r in results})
    labels = list(dict.fromkeys(r.label for r in results))
    rows = [[label] + [f"{acc.get(label, {}).get(d, float('nan')):.2f}" for d in depths] for label in labels]
    return format_table(["accuracy at depth"] + [f"{d:g}" for d in depths], rows)


def window_depth(results: Sequence[PasskeyResult]) -> float | None:
    """The depth from which the key is inside the view of the method of ``results`` (one label):
    key_distance falls linearly with depth, so two trials at different depths place it."""
    points = sorted({(r.depth, r.key_distance) for r in results})
    if results[0].view is None or len(points) < 2 or points[0][0] == points[-1][0]:
        return None
    (d1, k1), (d2, k2) = points[0], points[-1]
    return d1 + (results[0].view - k1) * (d2 - d1) / (k2 - k1)


STYLES = {"dense": ("-", "o"), "window": ("--", "s"), "recompute": (":", "^"), "streaming": ("-", "D")}


def plot_passkey(results: Sequence[PasskeyResult], path, title: str = "") -> Path:
    """Accuracy against the key's depth, per method and cache; a dashed line marks, per cache,
    the depth from which the key is inside the window when the question comes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    acc = _accuracy(results, lambda r: r.depth)
    for label, by in acc.items():
        mine = [r for r in results if r.label == label]
        ls, marker = STYLES.get(label.split()[0], ("-", "o"))
        line = ax.plot(list(by), list(by.values()), ls=ls, marker=marker, ms=5, label=label, alpha=0.85)[0]
        edge = window_depth(mine)
        if edge is not None and 0 <= edge <= 1:
            ax.axvline(edge, ls="--", color=line.get_color(), lw=0.8)
    ax.set(xlabel="depth of the passkey (0 = start of the stream, 1 = just before the question)",
           ylabel="accuracy", ylim=(-0.03, 1.03))
    ax.legend(fontsize=7)
    return save_figure(fig, path, title + "\n(dashed: from here on the key is inside that cache's window)")


# --- StreamEval --------------------------------------------------------------------------------


def streameval_rows(results: Sequence[StreamEvalResult]) -> list[dict]:
    return [{"label": r.label, "cache_size": r.cache_size, "after_line": r.query.after_line, "line": r.query.line,
             "distance": r.query.distance, "value": r.query.value, "position": r.position,
             "correct": "" if r.correct is None else int(r.correct), "answer": r.answer} for r in results]


def write_streameval_csv(results: Sequence[StreamEvalResult], path) -> Path:
    return write_csv(streameval_rows(results), path, ["label", "cache_size", "after_line", "line", "distance", "value",
                                                      "position", "correct", "answer"])


def _bucket(position: int, size: int) -> int:
    return (position // size) * size


def streameval_tables(results: Sequence[StreamEvalResult], bucket_tokens: int) -> str:
    labels = list(dict.fromkeys(r.label for r in results))
    by_len = _accuracy(results, lambda r: _bucket(r.position, bucket_tokens))
    spans = sorted({_bucket(r.position, bucket_tokens) for r in results})
    t1 = format_table(["accuracy, tokens read"] + [f"{s}-" for s in spans],
                      [[lb] + [_fmt(by_len.get(lb, {}).get(s)) for s in spans] for lb in labels])
    by_d = _accuracy(results, lambda r: r.query.distance)
    ds = sorted({r.query.distance for r in results})
    t2 = format_table(["accuracy, lines back"] + [str(d) for d in ds],
                      [[lb] + [_fmt(by_d.get(lb, {}).get(d)) for d in ds] for lb in labels])
    return t1 + "\n\n" + t2


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def plot_streameval(results: Sequence[StreamEvalResult], path, bucket_tokens: int, title: str = "") -> Path:
    """Accuracy against the tokens read (left) and against the query distance (right)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    by_len = _accuracy(results, lambda r: _bucket(r.position, bucket_tokens))
    by_d = _accuracy(results, lambda r: r.query.distance)
    for label in dict.fromkeys(r.label for r in results):
        if label in by_len:
            xs = list(by_len[label])
            ls, marker = STYLES.get(label.split()[0], ("-", "o"))
            style = dict(ls=ls, marker=marker, ms=5, alpha=0.85, label=label)
            a.plot([x + bucket_tokens / 2 for x in xs], list(by_len[label].values()), **style)
            b.plot(list(by_d[label]), list(by_d[label].values()), **style)
    a.set(xlabel="tokens of the stream read", ylabel="exact-match accuracy", ylim=(-0.03, 1.03))
    b.set(xlabel="lines back the question asks about", ylabel="exact-match accuracy", ylim=(-0.03, 1.03))
    a.legend(fontsize=7)
    return save_figure(fig, path, title)
