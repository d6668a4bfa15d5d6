"""Endless streams: latency and memory against tokens streamed, streaming cache vs dense attention.

The arms run one after the other, each in a fresh cache, so the memory measured is its own (and
the model's); every ``sample_every`` tokens a row records latency, memory and cache storage.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..cache import SinkCache, check_cache_sizes
from ..checks import ArgumentError, ArgumentTypeError, check_choice, check_choices, check_int, check_optional_int
from ..compat import new_dense_cache, vocab_size
from ..memory import MIB, cuda_allocated_bytes, release_freed_memory, rss_bytes, storage_layout
from ..report import progress_bar
from .arms import Forward, held_tokens
from .stats import latency_stats

STREAM_METHODS = ("streaming", "dense")
MODES = ("generate", "teacher-forced")
STREAM_COLUMNS = ["method", "tokens", "median_ms", "p90_ms", "rss_mib", "gpu_mib", "state_mib", "cached_tokens",
                  "elapsed_s"]


def check_stream_args(
    num_tokens: int, sample_every: int = 500, max_dense_tokens: int | None = None, mode: str = "generate",
    methods=STREAM_METHODS, sink_size: int = 4, window_size: int = 1020, chunk_size: int = 1, compile: bool = False,
) -> dict:
    """Validate :func:`bench_stream`'s arguments (no model needed); returns them normalised.

    Refuses a stream too short to fill the streaming cache (``num_tokens <= sink_size +
    window_size``): it would never evict, and measure nothing of streaming.
    """
    if not isinstance(compile, bool):
        raise ArgumentTypeError("compile", "must be True or False", compile)
    sink_size, window_size = check_cache_sizes(sink_size, window_size)
    a = dict(num_tokens=check_int("num_tokens", num_tokens, 1), sample_every=check_int("sample_every", sample_every, 1),
             max_dense_tokens=check_optional_int("max_dense_tokens", max_dense_tokens, 0),
             mode=check_choice("mode", mode, MODES), methods=check_choices("methods", methods, STREAM_METHODS),
             sink_size=sink_size, window_size=window_size, chunk_size=check_int("chunk_size", chunk_size, 1),
             compile=compile)
    if a["chunk_size"] > 1 and a["mode"] != "teacher-forced":
        raise ArgumentError("chunk_size", "must be 1 in generate mode (chunks need mode 'teacher-forced')", chunk_size)
    full = a["sink_size"] + a["window_size"]
    if "streaming" in a["methods"] and a["num_tokens"] <= full:
        raise ArgumentError("num_tokens", f"must exceed the streaming cache (sink_size + window_size = {full} tokens) "
                            "so that it fills and evicts; lower window_size or raise num_tokens", num_tokens,
                            mentions=("sink_size", "window_size", "num_tokens"))
    return a


@dataclass
class Snapshot:
    """The streaming cache and the process at one moment: ``tokens`` streamed, the cache's
    ``storage`` (:func:`~streamingllm.memory.storage_layout`), resident and CUDA memory (MiB;
    ``gpu_mib`` None off CUDA)."""

    tokens: int
    storage: list[tuple[int, int]]
    rss_mib: float
    gpu_mib: float | None

    @classmethod
    def take(cls, cache, tokens: int, device) -> Snapshot:
        gpu = cuda_allocated_bytes(device)
        rss = rss_bytes() or 0  # 0 where the platform gives no reading, as PeakMemory reports it
        return cls(tokens, storage_layout(cache), rss / MIB, None if gpu is None else gpu / MIB)


@dataclass
class StreamResult:
    """What :func:`bench_stream` measured.

    Attributes:
        rows: one row per sample with :data:`STREAM_COLUMNS`: ``method``, ``tokens`` (streamed so
            far), ``median_ms``/``p90_ms`` (per-token latency over the last ``sample_every``
            tokens), ``rss_mib``, ``gpu_mib`` (CUDA memory allocated; None on CPU), ``state_mib``
            (the cache's tensors), ``cached_tokens`` and ``elapsed_s`` (since the arm started).
        full, end: :class:`Snapshot` of the streaming arm when its cache first became full and at
            its end (None without a streaming arm).
        dense_tokens: tokens the dense arm streamed.
        dense_stop: why the dense arm stopped early (``"max_dense_tokens"``, ``"out of memory"``), or None.
        token_ids: with ``keep_ids`` in generate mode, each arm's generated ids (``{method: [id, ...]}``).
    """

    rows: list[dict] = field(default_factory=list)
    full: Snapshot | None = None
    end: Snapshot | None = None
    dense_tokens: int = 0
    dense_stop: str | None = None
    token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def storage_growth_bytes(self) -> int | None:
        """Growth of the streaming cache's storage from first full to the end (bytes)."""
        return None if self.full is None else sum(n for _, n in self.end.storage) - sum(n for _, n in self.full.storage)

    @property
    def storage_unchanged(self) -> bool | None:
        """True when no storage of the streaming cache was reallocated, grown or added after it filled."""
        return None if self.full is None else self.full.storage == self.end.storage


def _token_source(token_ids, num_tokens: int, vocab: int, seed: int, device) -> torch.Tensor:
    """(1, num_tokens) ids on ``device``: ``token_ids`` repeated as needed, or random ids."""
    if token_ids is None:
        return torch.randint(0, vocab, (1, num_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ArgumentError("token_ids", "must hold at least one token id")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ArgumentError("token_ids", f"must be ids in [0, {vocab})")
    return ids.repeat(-(-num_tokens // ids.numel()))[:num_tokens][None].to(device)


@torch.no_grad()
def bench_stream(model, num_tokens: int, sample_every: int = 500, max_dense_tokens: int | None = None,
                 mode: str = "generate", methods: Sequence[str] = STREAM_METHODS, sink_size: int = 4,
                 window_size: int = 1020, chunk_size: int = 1, token_ids=None, seed: int = 0, progress: bool = True,
                 compile: bool = False, keep_ids: bool = False) -> StreamResult:
    """Stream ``num_tokens`` tokens through the streaming cache, then through dense attention.

    Args:
        model: a causal LM on its benchmark device.
        num_tokens: tokens to stream per arm (with the streaming arm: > ``sink_size + window_size``).
        sample_every: record a row every this many tokens and at the end (with chunks: at the first
            chunk end at or past each multiple); latency is the median over the last ``sample_every``.
        max_dense_tokens: stop the dense arm after this many tokens (None: ``num_tokens``; 0 skips
            it), before it exhausts memory. It also stops at an out-of-memory error.
        mode: ``"generate"`` (greedy: each step feeds the previous step's argmax, timed with it) or
            ``"teacher-forced"`` (feeds given or random ids).
        methods: ``"streaming"`` and/or ``"dense"``.
        sink_size, window_size: the streaming cache (tokens).
        chunk_size: teacher-forced tokens per forward; > 1 feeds the streaming arm like
            :func:`streamingllm.feed.prefill` (exact), each token's latency the chunk's share.
        token_ids: teacher-forced ids (1D, repeated to ``num_tokens``; None: random ids from
            ``seed``). In generate mode the first id starts the stream.
        seed: seed for random ids.
        progress: show a progress bar (tokens/s) on stderr.
        compile: the full streaming cache's single-token steps run prepared and compiled (as the
            ``streaming-compiled`` arm of :func:`~streamingllm.bench.bench_decode`); the
            compilation happens in the first such step and is timed.
        keep_ids: generate mode: keep each arm's generated ids in ``StreamResult.token_ids``
            (to check exactness; a list that grows with the stream, so off for measurements).
    """
    a = check_stream_args(num_tokens, sample_every, max_dense_tokens, mode, methods, sink_size, window_size,
                          chunk_size, compile)
    if compile:
        torch._dynamo.reset()
    fwd = Forward(model, compile=compile)
    n_ids = a["num_tokens"] if a["mode"] == "teacher-forced" else 1
    ids = _token_source(token_ids, n_ids, vocab_size(model), seed, model.device)
    result = StreamResult()
    for m in a["methods"]:
        limit = a["num_tokens"]
        if m == "dense" and a["max_dense_tokens"] is not None and a["max_dense_tokens"] < limit:
            limit, result.dense_stop = a["max_dense_tokens"], "max_dense_tokens"
        if limit == 0:
            continue
        release_freed_memory()
        sink = m == "streaming"
        cache = SinkCache(model, a["sink_size"], a["window_size"]) if sink else new_dense_cache(model)
        try:
            done = _stream_arm(fwd, cache, m, ids, limit, a, result, progress, keep_ids)
        finally:
            del cache
            release_freed_memory()
        if not sink:
            result.dense_tokens = done
    return result


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _stream_arm(fwd: Forward, cache, method: str, ids: torch.Tensor, limit: int, a: dict,
                result: StreamResult, progress: bool, keep_ids: bool) -> int:
    """Stream ``limit`` tokens into ``cache``; append sample rows to ``result``; return tokens done."""
    k, generate, sink = a["sample_every"], a["mode"] == "generate", method == "streaming"
    kept = result.token_ids.setdefault(method, []) if keep_ids and generate else None
    ring = [0.0] * k  # per-token latencies of the last k tokens (seconds)
    step_ids = ids[:, :1].clone()  # reused every single-token step

    def work(done: int, q: int) -> None:  # the timed part
        if q > 1:
            fwd.feed(cache, ids[:, done : done + q], chunk_size=q)
            return
        logits = fwd.step(step_ids, cache)
        if generate:
            step_ids[:, 0] = logits[:, -1].argmax(-1)

    bar, done, next_sample = progress_bar(limit, f"stream {method}", "tok", progress), 0, k
    t_start = time.perf_counter()
    try:
        while done < limit:
            q = min(a["chunk_size"], limit - done)
            if not generate and q == 1:
                step_ids.copy_(ids[:, done : done + 1])
            try:
                dt = fwd.timed(work, done, q) / q
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if sink or not _is_oom(err):
                    raise
                result.dense_stop = "out of memory"
                break
            for i in range(done, done + q):
                ring[i % k] = dt
            done += q
            bar.update(q)
            if kept is not None:
                kept.append(int(step_ids[0, 0]))
            if sink and result.full is None and cache.cached_tokens == cache.max_cached_tokens:
                result.full = Snapshot.take(cache, done, fwd.device)
            if done >= next_sample or done == limit:
                stats, now = latency_stats(ring[: min(k, done)]), Snapshot.take(cache, done, fwd.device)
                result.rows.append({
                    "method": method, "tokens": done, "median_ms": stats["median_ms"], "p90_ms": stats["p90_ms"],
                    "rss_mib": now.rss_mib, "gpu_mib": now.gpu_mib, "state_mib": sum(n for _, n in now.storage) / MIB,
                    "cached_tokens": held_tokens(cache), "elapsed_s": time.perf_counter() - t_start})
                while next_sample <= done:
                    next_sample += k
                bar.set_postfix(ms=f"{stats['median_ms']:.1f}", rss=f"{now.rss_mib:.0f}MiB", refresh=False)
    finally:
        bar.close()
    if sink:
        result.end = Snapshot.take(cache, done, fwd.device)
    return done
