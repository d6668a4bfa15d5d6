"""Streaming perplexity: dense, window, sliding window with re-computation, and StreamingLLM.

The paper's language-modelling evaluation (Xiao et al., 2024, Sec. 4.1), as one API. Every
method scores the same text: the negative log-likelihood (NLL, nats) of token ``t`` given what
the method lets the model see when it reads token ``t - 1``:

* ``dense``: all of ``0 .. t - 1`` at their text positions (memory and time grow with ``t``);
* ``window`` with cache ``L``: only the last ``L`` tokens before ``t - 1`` (a SinkCache with no
  sinks), positions inside the cache;
* ``recompute`` with cache ``L``: the model is run afresh on ``t - 1 - L .. t - 1`` (positions
  0 .. L) for every scored token: the paper's quality reference, O(L) model tokens per token;
* ``streaming`` with ``S + W``: the first ``S`` tokens (the attention sinks) and the last ``W``,
  positions inside the cache. ``sink_text`` replaces the sinks by other tokens (prepended to the
  stream and never scored), the paper's "four newline tokens" experiment.

``window`` and ``streaming`` are evaluated in chunks with the cache's exact banded mask
(:func:`streamingllm.stream.iter_chunks`), which equals feeding tokens one by one; the tests
check it to 1e-4 per token. ``dense`` is chunked with the model's own causal mask.
"""

from __future__ import annotations

import csv
import inspect
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .cache import SinkCache, _check_int
from .stream import cache_kwargs, iter_chunks

METHODS: tuple[str, ...] = ("dense", "window", "recompute", "streaming")


@dataclass(frozen=True)
class Setting:
    """One method at one cache configuration.

    Attributes:
        method: one of :data:`METHODS`.
        sink_size: attention-sink tokens kept (``streaming`` only; 0 otherwise).
        window_size: recent tokens kept (``window``/``streaming``), or the context length of
            ``recompute``; None for ``dense``.
        sink_ids: token ids that replace the text's own first tokens as the sinks (``streaming``
            only; prepended to the stream, never scored); None = the text's own first tokens.
        sink_name: how ``sink_ids`` are shown in the label, e.g. ``'"\\n"'``.
    """

    method: str
    sink_size: int = 0
    window_size: int | None = None
    sink_ids: tuple[int, ...] | None = None
    sink_name: str | None = None

    @property
    def cache_size(self) -> int | None:
        """Tokens the method may hold (S + W); None for dense."""
        return None if self.window_size is None else self.sink_size + self.window_size

    @property
    def label(self) -> str:
        if self.method == "dense":
            return "dense"
        if self.method == "recompute":
            return f"recompute {self.window_size}"
        sinks = f"{self.sink_size}{self.sink_name}" if self.sink_ids else str(self.sink_size)
        return f"{self.method} {sinks}+{self.window_size}"


@dataclass
class Scores:
    """Per-token NLL of one :class:`Setting` on one text.

    Attributes:
        setting: what was evaluated.
        tokens: index in the evaluated text of each scored (predicted) token, ascending.
        nll: negative log-likelihood of each scored token, nats (float64).
        seconds: wall time of the evaluation.
        every: only every ``every``-th token was scored (``recompute`` subsampling).
    """

    setting: Setting
    tokens: np.ndarray
    nll: np.ndarray
    seconds: float = 0.0
    every: int = 1

    @property
    def ppl(self) -> float:
        return perplexity(self.nll)


def perplexity(nll: Sequence[float] | np.ndarray) -> float:
    """exp(mean NLL); NaN for no tokens."""
    nll = np.asarray(nll, dtype=np.float64)
    return float(np.exp(nll.mean())) if nll.size else float("nan")


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


def make_settings(
    methods: Iterable[str] = METHODS,
    sink_sizes: Sequence[int] = (4,),
    window_sizes: Sequence[int] | None = None,
    cache_sizes: Sequence[int] | None = None,
    sink_ids: Sequence[int] | None = None,
    sink_name: str = '"text"',
) -> list[Setting]:
    """Expand methods x cache configurations into the list of settings to evaluate.

    Give either ``window_sizes`` (every S is paired with every W) or ``cache_sizes`` (total
    cache L; W = L - S for every S, the paper's fixed-budget comparisons). ``window`` and
    ``recompute`` use the same total cache L = S + W as the streaming configurations, so each
    row compares methods at equal memory. Default: cache 1024.

    Args:
        methods: subset of :data:`METHODS`.
        sink_sizes: attention-sink counts S (tokens, >= 0).
        window_sizes: recent-token counts W (tokens, >= 1).
        cache_sizes: total cache sizes L (tokens, > every S).
        sink_ids: replace the sinks by these token ids, cycled to length S (streaming only).
        sink_name: how ``sink_ids`` are shown in labels.
    """
    methods = list(dict.fromkeys(methods))
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    if not methods:
        raise ValueError(f"methods is empty: choose from {', '.join(METHODS)}")
    sink_sizes = [_check_int("sink_size", s, 0) for s in sink_sizes]
    if not sink_sizes:
        raise ValueError("sink_size: give at least one value")
    if window_sizes is not None and cache_sizes is not None:
        raise ValueError("give either window_size or cache_size, not both")
    pairs: list[tuple[int, int]] = []
    if window_sizes is not None:
        pairs = [(s, _check_int("window_size", w, 1)) for s in sink_sizes for w in window_sizes]
    else:
        for total in cache_sizes or (1024,):
            total = _check_int("cache_size", total, 1)
            for s in sink_sizes:
                if total - s < 1:
                    raise ValueError(f"cache_size {total} leaves no room for a window after sink_size {s}: need cache_size > sink_size")
                pairs.append((s, total - s))
    if not pairs:
        raise ValueError("window_size/cache_size: give at least one value")
    if sink_ids is not None and not len(sink_ids):
        raise ValueError("sink text gives no tokens: give some text")
    totals = sorted({s + w for s, w in pairs})
    out: list[Setting] = []
    for m in methods:
        if m == "dense":
            out.append(Setting("dense"))
        elif m in ("window", "recompute"):
            out += [Setting(m, 0, total) for total in totals]
        else:
            for s, w in sorted(set(pairs), key=lambda p: (p[0] + p[1], p[0])):
                ids = tuple(sink_ids[i % len(sink_ids)] for i in range(s)) if sink_ids is not None and s else None
                out.append(Setting("streaming", s, w, ids, sink_name if ids else None))
    return out


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------

Progress = Callable[[int], None]  # called with the number of newly scored tokens


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL (nats, float64 on CPU) of ``targets`` (q,) under ``logits`` (q, vocab)."""
    return F.cross_entropy(logits.float(), targets, reduction="none").double().cpu()


def score_cached(model, ids: torch.Tensor, setting: Setting, chunk_size: int = 256, progress: Progress | None = None) -> Scores:
    """``window`` or ``streaming``: stream ``ids`` through a SinkCache in exact chunks.

    Args:
        model: a causal LM of a family SinkCache supports.
        ids: the text's token ids (1D, at least 2).
        setting: the cache configuration (``sink_size``, ``window_size``, optional ``sink_ids``).
        chunk_size: tokens per forward (>= 1); 1 is the token-by-token reference.
        progress: called with the number of tokens scored by each chunk.
    """
    prefix = torch.tensor(setting.sink_ids or (), dtype=torch.long)
    stream = torch.cat((prefix, ids[:-1].cpu()))  # the last token predicts nothing
    cache = SinkCache(model, sink_size=setting.sink_size, window_size=setting.window_size)
    targets = ids.to(model.device)
    k = len(prefix)  # stream index i predicts text token i + 1 - k
    parts, t0 = [], time.perf_counter()
    for start, logits in iter_chunks(model, cache, stream, chunk_size=chunk_size, exact=True):
        lo = max(start, k)  # stream positions whose prediction is a text token >= 1
        hi = start + logits.shape[1]
        if hi > lo:
            parts.append(_nll(logits[0, lo - start :], targets[lo + 1 - k : hi + 1 - k]))
            if progress:
                progress(hi - lo)
    nll = torch.cat(parts).numpy()
    return Scores(setting, np.arange(1, len(ids)), nll, time.perf_counter() - t0)


def score_dense(model, ids: torch.Tensor, chunk_size: int = 256, progress: Progress | None = None) -> Scores:
    """``dense``: every token sees the whole text before it, at its text position (DynamicCache)."""
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    cache = DynamicCache(config=model.config)
    pass_cache = cache_kwargs(model, cache)
    ids = ids.to(model.device)
    parts, t0 = [], time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(ids) - 1, chunk_size):
            piece = ids[start : min(start + chunk_size, len(ids) - 1)]
            logits = model(input_ids=piece[None], use_cache=True, **pass_cache).logits
            parts.append(_nll(logits[0], ids[start + 1 : start + 1 + len(piece)]))
            if progress:
                progress(len(piece))
    return Scores(Setting("dense"), np.arange(1, len(ids)), torch.cat(parts).numpy(), time.perf_counter() - t0)


def recompute_tokens(n_tokens: int, every: int) -> np.ndarray:
    """Indices of the tokens ``recompute`` scores: every ``every``-th of ``1 .. n_tokens - 1``."""
    return np.arange(every, n_tokens, every)


def score_recompute(
    model, ids: torch.Tensor, context: int, every: int = 1, progress: Progress | None = None
) -> Scores:
    """``recompute``: token t is predicted by a fresh forward over ``ids[t - 1 - context : t]``.

    The tokens ``t <= context + 1`` all share one forward over the text's first ``context + 1``
    tokens (their windows are its prefixes); every later scored token costs one forward of
    ``context + 1`` tokens, as in the paper.

    Args:
        context: tokens before ``t - 1`` the model may see (the cache size L).
        every: score only every ``every``-th token (>= 1).
    """
    context = _check_int("context", context, 1)
    every = _check_int("every", every, 1)
    ids = ids.to(model.device)
    wanted = recompute_tokens(len(ids), every)
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out, t0 = [], time.perf_counter()
    with torch.no_grad():
        early = wanted[wanted <= context + 1]
        if len(early):
            head = ids[: int(early[-1])]
            logits = model(input_ids=head[None], use_cache=False).logits[0]
            out.append(_nll(logits[early - 1], ids[early]))
            if progress:
                progress(len(early))
        for t in wanted[wanted > context + 1]:
            t = int(t)
            logits = model(input_ids=ids[t - 1 - context : t][None], use_cache=False, **keep_last).logits[0, -1:]
            out.append(_nll(logits, ids[t : t + 1]))
            if progress:
                progress(1)
    nll = torch.cat(out).numpy() if out else np.zeros(0)
    return Scores(Setting("recompute", 0, context), wanted, nll, time.perf_counter() - t0, every)


def evaluate(
    model,
    ids,
    settings: Sequence[Setting],
    *,
    chunk_size: int = 256,
    recompute_every: int = 1,
    max_dense_tokens: int | None = None,
    progress_factory: Callable[[Setting, int], object] | None = None,
) -> list[Scores]:
    """Score ``ids`` (1D token ids) with every setting.

    Args:
        model: a causal LM (eval mode).
        ids: the text's token ids, at least 2.
        settings: from :func:`make_settings`.
        chunk_size: tokens per forward pass for dense/window/streaming (>= 1).
        recompute_every: ``recompute`` scores every k-th token only (>= 1).
        max_dense_tokens: refuse ``dense`` on longer texts (its memory grows with the text).
        progress_factory: ``factory(setting, n_to_score)`` returns a progress object (e.g. a
            tqdm bar): its ``update(n)`` is told how many tokens were just scored, and its
            ``close()``, if any, is called when the setting is done.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError(f"the text gives {ids.numel()} token(s): need at least 2 to score one")
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    recompute_every = _check_int("recompute_every", recompute_every, 1)
    if max_dense_tokens is not None and any(s.method == "dense" for s in settings) and len(ids) > max_dense_tokens:
        raise ValueError(
            f"dense attention over {len(ids)} tokens exceeds max_dense_tokens={max_dense_tokens} "
            "(its KV cache grows with the text): lower num_tokens, raise max_dense_tokens, or drop dense"
        )
    for s in settings:  # fail before hours of work, not after
        if s.method in ("window", "streaming"):
            SinkCache(model, sink_size=s.sink_size, window_size=s.window_size)
    results = []
    for s in settings:
        n = len(recompute_tokens(len(ids), recompute_every)) if s.method == "recompute" else len(ids) - 1
        bar = progress_factory(s, n) if progress_factory else None
        progress = bar.update if bar is not None else None
        if s.method == "dense":
            results.append(score_dense(model, ids, chunk_size, progress))
        elif s.method == "recompute":
            results.append(score_recompute(model, ids, s.window_size, recompute_every, progress))
        else:
            results.append(score_cached(model, ids, s, chunk_size, progress))
        if hasattr(bar, "close"):
            bar.close()
    return results


# --------------------------------------------------------------------------------------
# Reports: summary table, CSV, plots
# --------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Perplexity per setting, overall and per segment of the text."""

    segments: list[tuple[int, int]]  # [lo, hi) token ranges
    rows: list[dict] = field(default_factory=list)
    subsampled: Scores | None = None  # the recompute run whose tokens the "@recompute" column uses


def summarize(results: Sequence[Scores], n_tokens: int, segment_tokens: int | None = None) -> Summary:
    """Perplexity of every result overall, per segment of ``segment_tokens`` tokens, and, when
    ``recompute`` was subsampled, on exactly the tokens it scored (a like-for-like column)."""
    seg = segment_tokens or max(1, math.ceil(n_tokens / 4))
    seg = _check_int("segment_tokens", seg, 1)
    segments = [(lo, min(lo + seg, n_tokens)) for lo in range(0, n_tokens, seg)]
    sub = next((r for r in results if r.setting.method == "recompute" and r.every > 1), None)
    summary = Summary(segments, subsampled=sub)
    for r in results:
        row = {"label": r.setting.label, "scored": len(r.nll), "ppl": r.ppl}
        for lo, hi in segments:
            sel = (r.tokens >= lo) & (r.tokens < hi)
            row[f"{lo}-{hi}"] = perplexity(r.nll[sel])
        if sub is not None:
            row["@recompute"] = perplexity(r.nll[np.isin(r.tokens, sub.tokens)])
        row["tok/s"] = len(r.nll) / r.seconds if r.seconds > 0 else float("nan")
        summary.rows.append(row)
    return summary


def format_summary(summary: Summary) -> str:
    """The summary as an aligned text table (perplexities; higher is worse)."""
    if not summary.rows:
        return "(no results)"
    cols = list(summary.rows[0])
    fmt = lambda c, v: f"{v:,}" if c == "scored" else (f"{v:.2f}" if isinstance(v, float) else str(v))
    cells = [[fmt(c, row[c]) for c in cols] for row in summary.rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths)))
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells]
    if summary.subsampled is not None:
        s = summary.subsampled
        out.append(
            f"note: {s.setting.label} scored every {s.every}th token only ({len(s.nll):,} tokens); "
            "'@recompute' gives every method's perplexity on exactly those tokens"
        )
    return "\n".join(out)


def write_summary_csv(summary: Summary, path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary.rows[0]))
        writer.writeheader()
        for row in summary.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


CSV_FIELDS = ("label", "method", "sink_size", "window_size", "token", "nll")


def write_nll_csv(results: Sequence[Scores], path: str | Path) -> None:
    """One row per scored token: label, method, S, W (empty for dense), token index, NLL (nats)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in results:
            s = r.setting
            head = (s.label, s.method, s.sink_size, "" if s.window_size is None else s.window_size)
            w.writerows((*head, int(t), f"{x:.6f}") for t, x in zip(r.tokens, r.nll))


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
        setting = Setting(method, sinks, window, (0,) * sinks if name else None, name or None)
        tokens = np.array(toks)
        every = int(tokens[1] - tokens[0]) if method == "recompute" and len(tokens) > 1 else 1
        out.append(Scores(setting, tokens, np.array(nll), 0.0, every))
    return out


def _moving_mean(x: np.ndarray, n: int) -> np.ndarray:
    """Mean of the last ``n`` values at each point (fewer at the start)."""
    c = np.concatenate(([0.0], np.cumsum(x)))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - n)
    return (c[i] - c[lo]) / (i - lo)


def plot_curves(results: Sequence[Scores], path: str | Path, smooth: int = 256, trained_length: int | None = None, title: str = "") -> None:
    """The paper's Figure 3: log perplexity (moving mean NLL over ``smooth`` tokens) vs token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = lambda r: max(1, smooth // r.every) if r.every == 1 else max(16, smooth // r.every)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for r in results:
        if not len(r.nll):
            continue
        style = dict(marker=".", ms=3, lw=1) if r.every > 1 else dict(lw=1.2)
        sub = f", every {r.every}th token, mean of {points(r)}" if r.every > 1 else ""
        ax.plot(r.tokens, _moving_mean(r.nll, points(r)), label=f"{r.setting.label} (ppl {r.ppl:.2f}{sub})", **style)
    settled = [_moving_mean(r.nll, points(r))[points(r) :] for r in results]
    settled = [x for x in settled if len(x)]
    if settled:  # the first tokens' high loss would squash the curves; keep them, off the scale
        ax.set_ylim(0, 1.15 * max(float(x.max()) for x in settled))
    last = max((int(r.tokens[-1]) for r in results if len(r.tokens)), default=0)
    if trained_length and trained_length < last:
        ax.axvline(trained_length, color="gray", ls="--", lw=1)
        ax.text(trained_length, ax.get_ylim()[0], " trained length", va="bottom", ha="left", color="gray", fontsize=8)
    ax.set_xlabel("token in the stream")
    ax.set_ylabel(f"log perplexity (mean NLL over the last {smooth} tokens)")
    ax.set_title(title or "Streaming perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(results: Sequence[Scores], path: str | Path, title: str = "") -> bool:
    """Perplexity against the swept cache parameter; returns False (no file) if nothing was swept.

    Several cache sizes: perplexity vs cache size, one line per method and sink count (Table 6).
    One cache size, several sink counts: perplexity vs number of sinks (Table 2).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cached = [r for r in results if r.setting.cache_size is not None]
    sizes = sorted({r.setting.cache_size for r in cached})
    sinks = sorted({r.setting.sink_size for r in cached if r.setting.method == "streaming"})
    if len(sizes) < 2 and len(sinks) < 2:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(sizes) >= 2:
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in cached:
            s = r.setting
            name = f"streaming S={s.sink_size}" if s.method == "streaming" else s.method
            lines.setdefault(name, []).append((s.cache_size, r.ppl))
        for name, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("cache size S + W (tokens)")
    else:
        pts = sorted((r.setting.sink_size, r.ppl) for r in cached if r.setting.method == "streaming")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"streaming, cache {sizes[0]}")
        for r in cached:
            if r.setting.method == "recompute":
                ax.axhline(r.ppl, color="gray", ls="--", lw=1, label=f"{r.setting.label}")
        ax.set_xticks(sinks)
        ax.set_xlabel("attention sinks S (W = cache - S)")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("perplexity")
    ax.set_title(title or "Perplexity sweep")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
