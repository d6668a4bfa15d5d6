"""``streamingllm bench decode|stream``: flags to keyword arguments, then tables, CSV and PNG files.

``bench decode --batch B ...`` times batched decode instead (:mod:`streamingllm.bench.batch`).

Flags are named after the library's parameters (``--sink-size`` is ``sink_size``), so the
library's own checks speak for them; only the command's own flags are checked here.
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

import torch

from ..checks import ArgumentError, check_int
from .options import add_cache_options, add_model_options, add_parser, check_trained_length, load_model
from ..report import pyplot, write_csv
from ..bench.batch import BATCH_COLUMNS, bench_batch, check_batch_args
from ..bench.decode import DECODE_COLUMNS, METHODS, bench_decode, check_decode_args
from ..bench.llamacpp import gguf_of
from ..bench.report import (batch_table, decode_table, load_average, machine_info, plot_decode, plot_stream,
                            stream_table)
from ..bench.stream import STREAM_COLUMNS, STREAM_METHODS, bench_stream, check_stream_args


def register(sub) -> None:
    """Add the ``bench`` command (``decode`` and ``stream``) to the subparsers ``sub``."""
    p = add_parser(sub, "bench", "speed and memory: latency vs cache size, endless streams")
    what = p.add_subparsers(dest="what", required=True, metavar="BENCHMARK")
    d = add_parser(what, "decode", "per-token latency and peak memory against cache size (the paper's Figure 10)")
    d.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="cache sizes (tokens)")
    d.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="arms to run (when not given: all; streaming-compiled compiles once per size)")
    d.add_argument("--batch", type=int, nargs="+", default=None, metavar="B",
                   help="batched decode instead: one step of B streams at once (each a full streaming cache of "
                   "each --sizes), for each B, against the smallest B; the streaming cache only (not with "
                   "--methods, --variants, --recompute-steps); writes batch.csv")
    d.add_argument("--steps", type=int, default=64, help="timed decode steps per arm and size")
    d.add_argument("--warmup", type=int, default=8, help="untimed steps per arm and size (recompute runs <= 2)")
    d.add_argument("--recompute-steps", type=int, default=None,
                   help="timed steps of the recompute arm (when not given: steps / 8)")
    d.add_argument("--block", type=int, default=8, help="steps per arm before switching arms")
    d.add_argument("--recompute-logits", default="all",
                   help="recompute arm: 'all' tokens' logits, as a plain forward (the paper's baseline), "
                   "or the 'last' only")
    d.add_argument("--sink-size", type=int, default=4, help="attention-sink tokens of the streaming cache")
    d.add_argument("--variants", nargs="+", default=[], metavar="DTYPE[+QUANTIZE]",
                   help="the streaming arms also on the model at these precisions, side by side "
                   "(e.g. bfloat16 bfloat16+int8 float32+int8)")
    s = add_parser(what, "stream", "latency and memory against tokens streamed: streaming vs dense")
    s.add_argument("--num-tokens", type=int, default=20000,
                   help="tokens to stream per arm (more than the streaming cache holds)")
    s.add_argument("--sample-every", type=int, default=500, help="record latency and memory every K tokens")
    s.add_argument("--max-dense-tokens", type=int, default=None,
                   help="stop the dense arm after this many tokens (0 skips it; when not given: no limit)")
    s.add_argument("--mode", default="generate", help="'generate' (greedy) or 'teacher-forced' (given or random ids)")
    s.add_argument("--methods", nargs="+", default=list(STREAM_METHODS), choices=STREAM_METHODS, help="arms to run")
    s.add_argument("--chunk-size", type=int, default=1, help="teacher-forced tokens per forward")
    s.add_argument("--text-file", type=Path, default=None,
                   help="teacher-forced text (when not given: random token ids)")
    s.add_argument("--compile", action="store_true",
                   help="streaming arm: prepared static-shape steps through torch.compile once the cache is full")
    add_cache_options(s)
    for q in (d, s):
        add_model_options(q, random_weights=True)
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads (when not given: torch's choice)")
        q.add_argument("--out", default="bench_out", help="folder for the CSV and PNG")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _read_text(args) -> str | None:
    """The ``--text-file`` text, checked before the model is loaded."""
    if args.text_file is None:
        return None
    if args.random_weights:
        raise ArgumentError("text_file", "needs the model's tokenizer: not with random_weights", mentions=("random_weights",))
    if args.mode != "teacher-forced":
        raise ArgumentError("text_file", "is for mode teacher-forced", mentions=("mode",))
    try:
        text = Path(args.text_file).read_text(encoding="utf-8")
    except OSError as err:
        raise ArgumentError("text_file", f"cannot be read ({err.strerror})", str(args.text_file)) from None
    if not text.strip():
        raise ArgumentError("text_file", "is empty", str(args.text_file))
    return text


def _variants(args) -> dict[str, tuple[str, str]]:
    """``--variants`` as ``{label: (dtype, quantize)}``, each checked before anything is loaded."""
    from ..models import check_dtype
    from ..precision import check_quantize

    out = {}
    for v in args.variants:
        dtype, _, quantize = v.partition("+")
        try:
            check_dtype(dtype)
            check_quantize(quantize or "none", args.device)
        except ArgumentError as err:
            raise ArgumentError("variants", f"takes DTYPE[+QUANTIZE] ({err})", v) from None
        out[v] = (dtype, quantize or "none")
    return out


def _show(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def run(args) -> int:
    """Run ``streamingllm bench decode|stream`` from parsed arguments; returns the exit status."""
    what = "batch" if args.what == "decode" and args.batch is not None else args.what
    if what == "batch":
        _refuse_with_batch(args)
    elif what == "decode" and args.methods is None:
        args.methods = list(METHODS)
    check = {"decode": check_decode_args, "batch": check_batch_args, "stream": check_stream_args}[what]
    a = check(**{k: getattr(args, k) for k in inspect.signature(check).parameters})  # before loading anything
    text = _read_text(args) if what == "stream" else None
    if what == "stream":
        check_trained_length(args)
    variants = _variants(args) if what == "decode" else {}
    if what != "batch":
        pyplot()  # the plots' extra, before the run rather than after
    if args.threads is not None:
        torch.set_num_threads(check_int("threads", args.threads, 1))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ArgumentError("out", "must be a folder, not a file", str(out))
    t0 = time.perf_counter()
    model, tokenizer = load_model(args)
    if what == "stream":
        check_trained_length(args, model)
    weights = "random weights" if args.random_weights else "trained weights"
    info = machine_info(model, args.device)
    print(f"model {args.model} ({weights}) loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"machine: {info}")
    print(f"{what}: " + ", ".join(f"{k.replace('_', ' ')} {_show(v)}" for k, v in a.items()))
    title = f"{args.model} ({weights}), {args.dtype}, {info.split(' | ')[0]}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if what == "decode":
        gguf = None if args.random_weights else gguf_of(args.model)
        rows = bench_decode(model, **a, seed=args.seed, progress=not args.no_progress, on_row=_report, gguf=gguf,
                            variants={v: load_model(args, *variant)[0] for v, variant in variants.items()})
        print(decode_table(rows))
        files = [write_csv(rows, out / "decode.csv", DECODE_COLUMNS), plot_decode(rows, out / "decode.png", title)]
    elif what == "batch":
        rows = bench_batch(model, **a, seed=args.seed, progress=not args.no_progress, on_row=_report)
        print(batch_table(rows))
        files = [write_csv(rows, out / "batch.csv", BATCH_COLUMNS)]
    else:
        ids = None if text is None else tokenizer(text, return_tensors="pt").input_ids[0]
        result = bench_stream(model, **a, token_ids=ids, seed=args.seed, progress=not args.no_progress)
        print(stream_table(result))
        files = [write_csv(result.rows, out / "stream.csv", STREAM_COLUMNS),
                 plot_stream(result.rows, out / "stream.png", title)]
    print(f"done in {time.perf_counter() - t0:.1f} s{load_average()}; wrote {', '.join(str(f) for f in files)}")
    return 0


def _refuse_with_batch(args) -> None:
    """``--batch`` times the streaming cache alone: refuse the flags that choose other arms."""
    given = [name for name, value in (("methods", args.methods), ("variants", args.variants or None),
                                      ("recompute_steps", args.recompute_steps)) if value is not None]
    if given:
        raise ArgumentError("batch", f"times the streaming cache alone: not with {', '.join(given)}",
                            mentions=tuple(given))


def _report(r: dict) -> None:
    """One line per row as soon as a size is done (useful in logs)."""
    arm = f"B={r['batch']}" if "batch" in r else r["method"]
    peak = f", peak {r['peak_mib']:.0f} MiB" if "peak_mib" in r else f", {r['tokens_per_s']:.1f} tokens/s"
    print(f"  N={r['size']} {arm}: median {r['median_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms{peak}", file=sys.stderr,
          flush=True)
