"""Streaming perplexity: dense, window, sliding window with re-computation, and StreamingLLM.

The paper's language-modelling evaluation (Xiao et al., 2024, Sec. 4.1), as one API. Every
method scores the same text: the negative log-likelihood (NLL, nats) of token ``t`` given what
the method lets the model see when it reads token ``t - 1``:

* ``dense``: all of ``0 .. t - 1`` at their text positions (memory and time grow with ``t``);
* ``window`` with cache ``L``: only the last ``L`` tokens before ``t - 1`` (a SinkCache with no
  sinks), positions inside the cache;
* ``recompute`` with cache ``L``: the model is run afresh on ``t - 1 - L .. t - 1`` (positions
  0 .. L) for every scored token: the paper's quality reference, O(L) model tokens per token
  (:func:`streamingllm.baselines.recompute_forward`, shared with the benchmarks);
* ``streaming`` with ``S + W``: the first ``S`` tokens (the attention sinks) and the last ``W``,
  positions inside the cache. ``sink_ids`` replace the sinks by other tokens (prepended to the
  stream and never scored), the paper's "four newline tokens" experiment.

``window`` and ``streaming`` are evaluated in chunks with the cache's exact banded mask
(:func:`streamingllm.feed.iter_chunks`), which equals feeding tokens one by one; the tests
check it to 1e-4 per token. ``dense`` is chunked with the model's own causal mask.

No I/O here: tables, CSV files and plots are in :mod:`streamingllm.evals.report`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..baselines import recompute_forward
from ..cache import BlockMemory, MemoryCache, SinkCache, TrainedLengthWarning
from ..checks import ArgumentError, check_choices, check_int, check_int_list, check_optional_int
from ..compat import cache_kwargs, new_dense_cache
from ..feed import iter_chunks
from ..families import past_trained_length

METHODS: tuple[str, ...] = ("dense", "window", "recompute", "streaming")
#: Every method: :data:`METHODS` (the default comparison) and ``memory``, streaming plus a memory of
#: the evicted blocks (:class:`~streamingllm.cache.MemoryCache`), asked for by name.
ALL_METHODS: tuple[str, ...] = METHODS + ("memory",)

#: ``recompute_every="auto"`` scores about this many tokens.
AUTO_RECOMPUTE_TOKENS = 256


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
        memory: ``memory`` only: the memory's settings (blocks retrieved, block size, ...).
    """

    method: str
    sink_size: int = 0
    window_size: int | None = None
    sink_ids: tuple[int, ...] | None = None
    sink_name: str | None = None
    memory: BlockMemory | None = None

    @property
    def cache_size(self) -> int | None:
        """Tokens the method may hold (S + W); None for dense. ``memory`` attends to its retrieved
        blocks and partial block besides (``memory.retrieved_tokens``)."""
        return None if self.window_size is None else self.sink_size + self.window_size

    @property
    def label(self) -> str:
        if self.method == "dense":
            return "dense"
        if self.method == "recompute":
            return f"recompute {self.window_size}"
        sinks = f"{self.sink_size}{self.sink_name}" if self.sink_ids else str(self.sink_size)
        extra = f" {self.memory.label()}" if self.memory is not None else ""
        return f"{self.method} {sinks}+{self.window_size}{extra}"

    def build_cache(self, model):
        """The cache that holds this setting's stream (``window``, ``streaming``, ``memory``)."""
        if self.method == "memory":
            return MemoryCache(model, self.sink_size, self.window_size, self.memory)
        if self.method in ("window", "streaming"):
            return SinkCache(model, sink_size=self.sink_size, window_size=self.window_size)
        raise ValueError(f"{self.method} reads without a streaming cache")


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

    def ppl_on(self, tokens: np.ndarray) -> float:
        """Perplexity over those of ``tokens`` (text indices) this run scored."""
        return perplexity(self.nll[np.isin(self.tokens, tokens)])


def perplexity(nll: Sequence[float] | np.ndarray) -> float:
    """exp(mean NLL); NaN for no tokens."""
    nll = np.asarray(nll, dtype=np.float64)
    return float(np.exp(nll.mean())) if nll.size else float("nan")


def subsampled(results: Sequence[Scores]) -> Scores | None:
    """The first ``recompute`` run that scored only every k-th token (k > 1), if any.

    Every such run of one text scores the same tokens (:func:`recompute_tokens`), so its tokens
    are where all methods can be compared like for like.
    """
    return next((r for r in results if r.setting.method == "recompute" and r.every > 1), None)


# --------------------------------------------------------------------------------------
# Settings and options
# --------------------------------------------------------------------------------------


def _int_list(param: str, values, minimum: int) -> list[int]:
    return check_int_list(param, [values] if isinstance(values, int) else values, minimum)


def make_settings(
    methods: Iterable[str] = METHODS,
    sink_size: int | Sequence[int] = (4,),
    window_size: int | Sequence[int] | None = None,
    cache_size: int | Sequence[int] | None = None,
    sink_ids: Sequence[int] | None = None,
    sink_name: str = '"text"',
    memory: BlockMemory | None = None,
) -> list[Setting]:
    """Expand methods x cache configurations into the list of settings to evaluate.

    Give either ``window_size`` (every S is paired with every W) or ``cache_size`` (total
    cache L; W = L - S for every S, the paper's fixed-budget comparisons). ``window`` and
    ``recompute`` use the same total cache L = S + W as the streaming configurations, so each
    row compares methods at equal memory. Default: cache 1024.

    Args:
        methods: one or more of :data:`METHODS` (evaluated in that order).
        sink_size: attention-sink counts S (tokens, >= 0), one or a list.
        window_size: recent-token counts W (tokens, >= 1), one or a list.
        cache_size: total cache sizes L (tokens, > every S), one or a list.
        sink_ids: replace the sinks by these token ids, cycled to length S (streaming only).
        sink_name: how ``sink_ids`` are shown in labels.
        memory: the memory's settings for ``memory`` (default :class:`~streamingllm.cache.BlockMemory`()):
            it keeps the same S + W as streaming, plus what it retrieves.
    """
    methods = check_choices("methods", methods, ALL_METHODS)
    sinks = _int_list("sink_size", sink_size, 0)
    if window_size is not None and cache_size is not None:
        raise ArgumentError("window_size", "cannot be combined with a cache size (W = cache size - S): give one of them")
    if window_size is not None:
        pairs = [(s, w) for s in sinks for w in _int_list("window_size", window_size, 1)]
    else:
        totals = _int_list("cache_size", 1024 if cache_size is None else cache_size, 1)
        for total in totals:
            if total <= max(sinks):
                raise ArgumentError("cache_size", f"must be larger than the sink size {max(sinks)}, to leave room "
                                    "for a window", total)
        pairs = [(s, total - s) for total in totals for s in sinks]
    if sink_ids is not None and not len(sink_ids):
        raise ArgumentError("sink_ids", "must hold at least one token id", list(sink_ids))
    totals = sorted({s + w for s, w in pairs})
    out: list[Setting] = []
    for m in methods:
        if m == "dense":
            out.append(Setting("dense"))
        elif m in ("window", "recompute"):
            out += [Setting(m, 0, total) for total in totals]
        elif m == "memory":
            out += [Setting("memory", s, w, memory=memory or BlockMemory())
                    for s, w in sorted(set(pairs), key=lambda p: (p[0] + p[1], p[0]))]
        else:
            for s, w in sorted(set(pairs), key=lambda p: (p[0] + p[1], p[0])):
                ids = tuple(sink_ids[i % len(sink_ids)] for i in range(s)) if sink_ids is not None and s else None
                out.append(Setting("streaming", s, w, ids, sink_name if ids else None))
    return out


def sink_tokens(tokenizer, sink_text: str) -> tuple[list[int], str]:
    """The token ids of ``sink_text`` (no special tokens) and its name for labels (``'"\\n"'``)."""
    ids = tokenizer(sink_text, add_special_tokens=False).input_ids if sink_text else []
    if not ids:
        raise ArgumentError("sink_text", "must give at least one token (e.g. a newline)", sink_text)
    return ids, '"' + sink_text.encode("unicode_escape").decode() + '"'


def check_options(
    *,
    chunk_size: int = 256,
    recompute_every: int | str = "auto",
    max_dense_tokens: int | None = None,
    segment_tokens: int | None = None,
    smooth: int = 256,
    sink_text: str | None = None,
) -> None:
    """Check an evaluation's scalar options at once, before a model is loaded (the text window's
    ``offset`` and ``num_tokens`` are checked by :func:`streamingllm.evals.corpus.check_window`).

    Args:
        chunk_size: tokens per forward pass (>= 1), see :func:`evaluate`.
        recompute_every: ``"auto"`` or an integer >= 1, see :func:`recompute_step`.
        max_dense_tokens: None or an integer >= 2, see :func:`evaluate`.
        segment_tokens: None or an integer >= 1, see :func:`summarize`.
        smooth: tokens of the plots' moving mean (>= 1).
        sink_text: None, or the non-empty text whose tokens replace the sinks.
    """
    check_int("chunk_size", chunk_size, 1)
    if recompute_every != "auto":
        try:
            check_int("recompute_every", recompute_every, 1)
        except ArgumentError as err:
            raise ArgumentError("recompute_every", "must be 'auto' or an integer >= 1", recompute_every) from err
    check_optional_int("max_dense_tokens", max_dense_tokens, 2)
    check_optional_int("segment_tokens", segment_tokens, 1)
    check_int("smooth", smooth, 1)
    if sink_text is not None and not sink_text:
        raise ArgumentError("sink_text", "must be the text whose tokens become the sinks, e.g. a newline", sink_text)


def recompute_step(n_tokens: int, recompute_every: int | str = "auto") -> int:
    """The k of ``recompute`` scoring every k-th token of an ``n_tokens`` text: ``recompute_every``
    itself, or for ``"auto"`` the k that scores about :data:`AUTO_RECOMPUTE_TOKENS` tokens."""
    check_options(recompute_every=recompute_every)
    if recompute_every == "auto":
        return max(1, round((n_tokens - 1) / AUTO_RECOMPUTE_TOKENS))
    return int(recompute_every)


def check_trained_length(model, settings: Sequence[Setting]) -> None:
    """Warn (one line) when a setting's cache reaches the model's trained length: its next token
    would sit at a position the model never saw in training."""
    over = {s.cache_size: past_trained_length(model, s.cache_size) for s in settings if s.cache_size is not None}
    over = {size: trained for size, trained in over.items() if trained is not None}
    if over:
        sizes, trained = ", ".join(map(str, sorted(over))), next(iter(over.values()))
        warnings.warn(f"cache size{'s' if len(over) > 1 else ''} {sizes} reach{'' if len(over) > 1 else 'es'} the "
                      f"model's trained length {trained}: positions from {trained} on were never trained",
                      TrainedLengthWarning, stacklevel=3)


@contextmanager
def _trained_length_said_once():
    """Silence SinkCache's own warning about the trained length (one per cache built):
    :func:`check_trained_length` says it once for all settings, recompute's included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainedLengthWarning)
        yield


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------

Progress = Callable[[int], None]  # called with the number of newly scored tokens


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL (nats, float64 on CPU) of ``targets`` (q,) under ``logits`` (q, vocab)."""
    return F.cross_entropy(logits.float(), targets, reduction="none").double().cpu()


def score_cached(model, ids: torch.Tensor, setting: Setting, chunk_size: int = 256, progress: Progress | None = None) -> Scores:
    """``window``, ``streaming`` or ``memory``: stream ``ids`` through the setting's cache in exact chunks
    (``memory``: chunks of at most its lookup size, each one lookup).

    Args:
        model: a causal LM of a family SinkCache supports.
        ids: the text's token ids (1D, at least 2).
        setting: the cache configuration (``sink_size``, ``window_size``, optional ``sink_ids``).
        chunk_size: tokens per forward (>= 1); 1 is the token-by-token reference.
        progress: called with the number of tokens scored by each chunk.
    """
    prefix = torch.tensor(setting.sink_ids or (), dtype=torch.long)
    stream = torch.cat((prefix, ids[:-1].cpu()))  # the last token predicts nothing
    cache = setting.build_cache(model)
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
    chunk_size = check_int("chunk_size", chunk_size, 1)
    pass_cache = cache_kwargs(model, new_dense_cache(model))
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


#: Tokens per re-computation forward, all windows of the batch together (see :func:`score_recompute`).
RECOMPUTE_BATCH_TOKENS = 4096


def recompute_tokens(n_tokens: int, every: int) -> np.ndarray:
    """Indices of the tokens ``recompute`` scores: every ``every``-th of ``1 .. n_tokens - 1``."""
    return np.arange(every, n_tokens, every)


def score_recompute(
    model, ids: torch.Tensor, context: int, every: int = 1, progress: Progress | None = None,
    batch_tokens: int = RECOMPUTE_BATCH_TOKENS,
) -> Scores:
    """``recompute``: token t is predicted by a fresh forward over ``ids[t - 1 - context : t]``.

    The tokens ``t <= context + 1`` all share one forward over the text's first ``context + 1``
    tokens (their windows are its prefixes); every later scored token costs a window of
    ``context + 1`` tokens, as in the paper, and the windows go through the model as batches of
    about ``batch_tokens`` tokens (the strongest re-computation: one window per forward leaves
    a GPU idle).

    Args:
        context: tokens before ``t - 1`` the model may see (the cache size L).
        every: score only every ``every``-th token (>= 1).
        batch_tokens: tokens per forward, all windows together (>= 1; one window at least).
    """
    context = check_int("context", context, 1)
    every = check_int("every", every, 1)
    batch = max(1, check_int("batch_tokens", batch_tokens, 1) // (context + 1))
    ids = ids.to(model.device)
    wanted = recompute_tokens(len(ids), every)
    out, t0 = [], time.perf_counter()
    early = wanted[wanted <= context + 1]
    if len(early):
        logits = recompute_forward(model, ids[: int(early[-1])][None], last_only=False)[0]
        out.append(_nll(logits[early - 1], ids[early]))
        if progress:
            progress(len(early))
    late = wanted[wanted > context + 1]
    windows = ids.unfold(0, context + 1, 1)  # window starting at s: ids[s : s + context + 1], a view
    for k in range(0, len(late), batch):
        t = torch.as_tensor(late[k : k + batch], device=ids.device)
        out.append(_nll(recompute_forward(model, windows[t - 1 - context]), ids[t]))
        if progress:
            progress(len(t))
    nll = torch.cat(out).numpy() if out else np.zeros(0)
    return Scores(Setting("recompute", 0, context), wanted, nll, time.perf_counter() - t0, every)


def evaluate(
    model,
    ids,
    settings: Sequence[Setting],
    *,
    chunk_size: int = 256,
    recompute_every: int | str = 1,
    max_dense_tokens: int | None = None,
    progress_factory: Callable[[Setting, int], object] | None = None,
) -> list[Scores]:
    """Score ``ids`` (1D token ids) with every setting.

    Everything is checked before the first setting is scored: the options, the text's length,
    every cache (e.g. an ALiBi table too short for it). A cache larger than the model's trained
    length is warned about (:func:`check_trained_length`).

    Args:
        model: a causal LM (eval mode).
        ids: the text's token ids, at least 2.
        settings: from :func:`make_settings`.
        chunk_size: tokens per forward pass for dense/window/streaming (>= 1).
        recompute_every: ``recompute`` scores every k-th token only (>= 1, or ``"auto"``: see
            :func:`recompute_step`).
        max_dense_tokens: refuse ``dense`` on longer texts (its memory grows with the text).
        progress_factory: ``factory(setting, n_to_score)`` returns a progress object (e.g. a
            tqdm bar): its ``update(n)`` is told how many tokens were just scored, and its
            ``close()``, if any, is called when the setting is done.
    """
    check_options(chunk_size=chunk_size, recompute_every=recompute_every, max_dense_tokens=max_dense_tokens)
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError(f"the text gives {ids.numel()} token(s): need at least 2 to score one")
    every = recompute_step(len(ids), recompute_every)
    if max_dense_tokens is not None and any(s.method == "dense" for s in settings) and len(ids) > max_dense_tokens:
        raise ArgumentError(
            "max_dense_tokens", f"is below the text's {len(ids)} tokens: dense attention's KV cache grows with the "
            "text; lower num_tokens, raise max_dense_tokens, or drop dense", max_dense_tokens,
            mentions=("num_tokens", "max_dense_tokens"))
    with _trained_length_said_once():
        for s in settings:  # fail before hours of work, not after
            if s.method in ("window", "streaming", "memory"):
                s.build_cache(model)
    check_trained_length(model, settings)
    results = []
    for s in settings:
        n = len(recompute_tokens(len(ids), every)) if s.method == "recompute" else len(ids) - 1
        bar = progress_factory(s, n) if progress_factory else None
        progress = bar.update if bar is not None else None
        with _trained_length_said_once():
            if s.method == "dense":
                results.append(score_dense(model, ids, chunk_size, progress))
            elif s.method == "recompute":
                results.append(score_recompute(model, ids, s.window_size, every, progress))
            else:
                results.append(score_cached(model, ids, s, chunk_size, progress))
        if hasattr(bar, "close"):
            bar.close()
    return results


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Perplexity per setting, overall and per segment of the text.

    Attributes:
        segments: the ``[lo, hi)`` token ranges of the per-segment columns (named ``"lo-hi"``).
        rows: one dict per result: ``label``, ``scored``, ``ppl``, one column per segment,
            ``@recompute`` (when ``subsampled``) and ``tok/s``.
        subsampled: the recompute run whose tokens the ``@recompute`` column uses.
    """

    segments: list[tuple[int, int]]
    rows: list[dict] = field(default_factory=list)
    subsampled: Scores | None = None


def summarize(results: Sequence[Scores], n_tokens: int, segment_tokens: int | None = None) -> Summary:
    """Perplexity of every result overall, per segment of ``segment_tokens`` tokens (default: a
    quarter of the text), and, when ``recompute`` was subsampled, on exactly the tokens it scored
    (a like-for-like column)."""
    seg = check_optional_int("segment_tokens", segment_tokens, 1) or max(1, math.ceil(n_tokens / 4))
    segments = [(lo, min(lo + seg, n_tokens)) for lo in range(0, n_tokens, seg)]
    sub = subsampled(results)
    summary = Summary(segments, subsampled=sub)
    for r in results:
        row = {"label": r.setting.label, "scored": len(r.nll), "ppl": r.ppl}
        for lo, hi in segments:
            sel = (r.tokens >= lo) & (r.tokens < hi)
            row[f"{lo}-{hi}"] = perplexity(r.nll[sel])
        if sub is not None:
            row["@recompute"] = r.ppl_on(sub.tokens)
        row["tok/s"] = len(r.nll) / r.seconds if r.seconds > 0 else float("nan")
        summary.rows.append(row)
    return summary
