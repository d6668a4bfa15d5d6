"""Per-token decode latency and memory against cache size: the paper's Figure 10.

Every arm holds N tokens before each timed step. The arms are interleaved in blocks of steps,
their order rotating every round (:func:`~streamingllm.bench.schedule.interleave`), so machine
noise hits all of them alike.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from ..checks import ArgumentError, check_choice, check_choices, check_int, check_int_list
from ..compat import vocab_size
from ..memory import MIB, PeakMemory, release_freed_memory, storage_bytes
from ..report import progress_bar
from .arms import Arm, Forward
from .roofline import copy_bandwidth, limit_ms
from .schedule import interleave
from .stats import add_ratios, latency_stats

METHODS = ("streaming", "streaming-compiled", "dense", "dense-compiled", "recompute", "llama.cpp")
COMPILED = ("streaming-compiled", "dense-compiled")
RECOMPUTE_LOGITS = ("all", "last")
FILL_EXTRA = 64  # tokens fed to the streaming arm past its capacity, so it is evicting when timed
DECODE_COLUMNS = [
    "size", "method", "steps", "median_ms", "p90_ms", "mean_ms", "state_mib", "peak_mib", "mem_source",
    "vs_dense", "vs_dense_compiled", "vs_llamacpp", "speedup_vs_recompute", "limit_ms", "vs_limit",
]


def check_sizes(sizes, sink_size: int) -> tuple[list[int], int]:
    """Cache sizes (tokens) and the sink size checked together: each cache of N tokens holds the
    sinks and at least one window token. Returns ``(sizes, sink_size)`` normalised."""
    sink_size = check_int("sink_size", sink_size, 0)
    sizes = check_int_list("sizes", sizes)
    if min(sizes) <= sink_size:
        raise ArgumentError("sizes", f"must each be > the sink size ({sink_size}): a cache of N tokens holds the "
                            f"sinks and N - {sink_size} window tokens", sizes)
    return sizes, sink_size


def check_decode_args(
    sizes, methods=METHODS, steps: int = 64, warmup: int = 8, recompute_steps: int | None = None,
    sink_size: int = 4, block: int = 8, recompute_logits: str = "all",
) -> dict:
    """Validate :func:`bench_decode`'s arguments (no model needed); returns them normalised.

    Raises :class:`~streamingllm.checks.ArgumentError` (a ``ValueError``; ``TypeError`` for a
    wrong type) naming the parameter.
    """
    sizes, sink_size = check_sizes(sizes, sink_size)
    steps = check_int("steps", steps, 1)
    return dict(
        sizes=sizes, methods=check_choices("methods", methods, METHODS), steps=steps,
        warmup=check_int("warmup", warmup, 0), sink_size=sink_size, block=check_int("block", block, 1),
        recompute_steps=max(1, steps // 8) if recompute_steps is None
        else check_int("recompute_steps", recompute_steps, 1),
        recompute_logits=check_choice("recompute_logits", recompute_logits, RECOMPUTE_LOGITS),
    )


@torch.no_grad()
def bench_decode(model, sizes: Sequence[int] = (256, 512, 1024, 2048, 4096), methods: Sequence[str] = METHODS,
                 steps: int = 64, warmup: int = 8, recompute_steps: int | None = None, sink_size: int = 4,
                 block: int = 8, seed: int = 0, progress: bool = True, on_row: Callable[[dict], None] | None = None,
                 recompute_logits: str = "all", gguf=None, variants: dict | None = None) -> list[dict]:
    """Per-token decode latency and memory of each method (arm) at each cache size.

    Args:
        model: a causal LM (any family :class:`~streamingllm.cache.SinkCache` supports) on its device.
        sizes: cache sizes N (tokens; each > ``sink_size``). Every arm holds N tokens before each
            timed step, so the new token attends to N + 1 keys (recompute: N tokens, itself included).
        methods: arms to run (:mod:`streamingllm.bench.arms`): ``"streaming"``, ``"streaming-compiled"``
            and ``"dense-compiled"`` (compiled once per size in two extra untimed steps; dropped
            with a ``RuntimeWarning`` when compilation fails), ``"dense"``, ``"recompute"``,
            ``"llama.cpp"`` (needs ``gguf`` and llama-cpp-python; dropped with a ``RuntimeWarning``
            without them).
        steps: timed single-token steps per arm and size (streaming, dense).
        warmup: untimed steps per arm and size (recompute: at most 2, each a full forward); at
            least one, as peak memory is measured over them.
        recompute_steps: timed steps of the recompute arm (default ``max(1, steps // 8)``).
        sink_size: attention sinks of the streaming arms (tokens).
        block: steps an arm runs before the next takes over; the arm order rotates every round.
        seed: seed of the random token ids, the same for all arms.
        progress: show a progress bar on stderr.
        on_row: called with each size's rows as soon as they are measured.
        recompute_logits: ``"all"``: the recompute forward computes every token's logits, as a
            plain forward (the paper's baseline); ``"last"``: the last token's only (stronger).
        gguf: the GGUF file ``model`` was loaded from, for the llama.cpp arm.
        variants: more copies of the model at other precisions, ``{label: model}`` (e.g.
            ``"bfloat16+int8"``): each adds the arms ``streaming@label`` and, when
            ``"streaming-compiled"`` is among ``methods``, ``streaming-compiled@label``.

    Returns:
        One row per (size, method) with :data:`DECODE_COLUMNS`: ``steps`` (timed), ``median_ms``,
        ``p90_ms``, ``mean_ms`` (:func:`latency_stats`), ``state_mib`` (the arm's cache tensors;
        0 for recompute), ``peak_mib`` (the process's peak memory while the arm steps, with the
        model and this arm's state only: exact on CUDA, resident memory on CPU), ``mem_source``
        (``"cuda"``, ``"rss_hwm"`` or ``"rss"``), ``vs_dense``, ``vs_dense_compiled`` and
        ``vs_llamacpp`` (median / that arm's median), ``speedup_vs_recompute`` (recompute
        median / this median), ``limit_ms`` (the memory-bandwidth limit of a step attending to N + 1
        keys: :mod:`streamingllm.bench.roofline`) and ``vs_limit`` (median / limit).
    """
    a = check_decode_args(sizes, methods, steps, warmup, recompute_steps, sink_size, block, recompute_logits)
    mem = PeakMemory(model.device)
    bandwidth = copy_bandwidth(model.device)
    gen, vocab = torch.Generator().manual_seed(seed), vocab_size(model)
    release_freed_memory()
    baseline = mem.current()
    models = {"": model, **{f"@{label}": m for label, m in (variants or {}).items()}}
    labels = list(a["methods"]) + [f"{m}{suffix}" for suffix in list(models)[1:] for m in a["methods"]
                                   if m in ("streaming", "streaming-compiled")]
    if "llama.cpp" in labels and not _llama_ready(gguf):
        labels.remove("llama.cpp")
    counts = {m: a["recompute_steps"] if m == "recompute" else a["steps"] for m in labels}
    warms = {m: min(max(a["warmup"], 1), 2) if m == "recompute" else max(a["warmup"], 1) for m in labels}
    methods_now, rows = list(labels), []  # a compiled arm leaves when compilation fails
    bar = progress_bar(len(a["sizes"]) * sum(counts[m] + warms[m] for m in methods_now), "decode", "step", progress)
    try:
        for n in a["sizes"]:
            compiled = any(m.partition("@")[0] in COMPILED for m in methods_now)
            if compiled:
                torch._dynamo.reset()  # fresh compiled forwards per size (shapes differ)
            fwds = {suffix: Forward(m, compile=compiled) for suffix, m in models.items()}
            ids = torch.randint(0, vocab, (1, n + FILL_EXTRA), generator=gen).to(model.device)
            toks = torch.randint(0, vocab, (max(counts.values()) + max(warms.values()), 1, 1), generator=gen)
            toks = toks.to(model.device)
            arms, peaks = {}, {}
            for m in list(methods_now):
                filled = _fill_arm(m, fwds, n, ids, toks, a, gguf, warms[m], mem, baseline, bar)
                if filled is None:  # compilation failed (warned)
                    methods_now.remove(m)
                    continue
                arms[m], peaks[m] = filled
            if not arms:  # every arm dropped
                continue
            bar.set_description(f"decode N={n}")
            times = interleave({m: _stepper(arm, toks, warms[m]) for m, arm in arms.items()},
                               {m: counts[m] for m in arms}, a["block"], rounds=math.ceil(a["steps"] / a["block"]),
                               sync=next(iter(fwds.values())).sync, after={m: arm.after for m, arm in arms.items()},
                               on_step=lambda m: bar.update(1))
            rows += [_row(m, arm, n, times[m], peaks[m], mem.source, bandwidth) for m, arm in arms.items()]
            add_ratios(rows)
            if on_row is not None:
                for r in rows[-len(arms):]:
                    on_row(r)
            arms = None  # freed before the next size's memory probes
    finally:
        bar.close()
    return rows


def _fill_arm(m: str, fwds: dict, n: int, ids: torch.Tensor, toks: torch.Tensor, a: dict, gguf, warm: int,
              mem: PeakMemory, baseline: int, bar) -> tuple[Arm, int] | None:
    """Build arm ``m`` holding ``n`` tokens, compile it if it is a compiled arm, and run its ``warm``
    untimed steps; returns the arm and its peak memory (bytes, with the model and this arm's state
    only), or None (with a ``RuntimeWarning``) when its compilation failed."""
    bar.set_description(f"decode N={n} fill {m}")
    release_freed_memory()
    before = mem.current()
    method, _, label = m.partition("@")
    arm = Arm(method, fwds[f"@{label}" if label else ""], n, ids, a["sink_size"],
              last_only=a["recompute_logits"] == "last", gguf=gguf)
    if method in COMPILED:
        try:
            before += _compile(arm, toks, mem)
        except Exception as err:  # no C++ compiler, unsupported backend, ...
            first_line = (str(err).splitlines() or [""])[0]
            why = str(err) if isinstance(err, _FellBack) else f"{type(err).__name__}: {first_line}"
            warnings.warn(f"torch.compile failed, dropping the {m} arm: {why}", RuntimeWarning, stacklevel=3)
            return None
    release_freed_memory()
    arm.fwd.sync()
    mem.reset_peak()
    for tok in toks[:warm]:  # untimed: warm-up and memory probe
        arm.step(tok)
        arm.after()
        bar.update(1)
    arm.fwd.sync()
    return arm, baseline + mem.peak() - before


def _row(m: str, arm: Arm, n: int, times_s: list[float], peak: int, mem_source: str, bandwidth) -> dict:
    """One arm's row at size ``n`` (see :func:`bench_decode`), after checking it held ``n`` tokens."""
    arm.check_held()
    stats = latency_stats(times_s)
    limit = None if m == "llama.cpp" else limit_ms(arm.fwd.model, n + 1, bandwidth)
    return {"size": n, "method": m, "steps": stats.pop("n"), **stats,
            "state_mib": 0.0 if arm.state is None else storage_bytes(arm.state) / MIB,
            "peak_mib": peak / MIB, "mem_source": mem_source, "limit_ms": limit,
            "vs_limit": None if limit is None else stats["median_ms"] / limit}


def _compile(arm: Arm, toks: torch.Tensor, mem: PeakMemory) -> int:
    """Compile the arm's step in two untimed steps; returns the compiler's own memory (bytes),
    which is not the arm's. Raises RuntimeError when the step fell back to eager."""
    release_freed_memory()
    built = mem.current()
    for tok in toks[:2]:
        arm.step(tok)
        arm.after()
    if arm.method == "streaming-compiled" and not arm.fwd.decode.compiled:
        raise _FellBack(arm.fwd.decode.failure)
    release_freed_memory()
    return mem.current() - built


class _FellBack(RuntimeError):
    """The compiled decode step failed and fell back to eager (the message says why)."""


def _llama_ready(gguf) -> bool:
    """Whether the llama.cpp arm can run; says why not (RuntimeWarning) when it cannot."""
    from .llamacpp import available

    why = ("the model was not loaded from a GGUF file" if gguf is None
           else None if available() else "llama-cpp-python is not installed (pip install 'streamingllm[llamacpp]')")
    if why:
        warnings.warn(f"skipping the llama.cpp arm: {why}", RuntimeWarning, stacklevel=3)
    return why is None


def _stepper(arm: Arm, toks: torch.Tensor, first: int) -> Callable[[int], None]:
    """The arm's timed call ``i``: one step on token ``first + i`` (the tokens before went to its warm-up)."""
    return lambda i: arm.step(toks[first + i])
