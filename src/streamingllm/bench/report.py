"""The benchmarks' figures and terminal tables, and the line that says where numbers come from."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from ..report import format_table, pyplot, save_figure
from .stats import speedups
from .stream import STREAM_METHODS, StreamResult

# Streaming and dense latencies (and both streaming arms' memory) are nearly equal: dense is dashed
# with large hollow circles, the compiled arm dash-dotted with hollow squares, the streaming arm
# solid with small filled dots drawn on top, so every line stays visible where they overlap.
STYLES = {
    "streaming": dict(color="tab:blue", ls="-", marker="o", ms=4, zorder=5, label="StreamingLLM (SinkCache)"),
    "streaming-compiled": dict(color="tab:green", ls="-.", marker="s", ms=7, mfc="none", mew=1.5, zorder=4,
                               label="StreamingLLM, compiled (torch.compile)"),
    "dense": dict(color="tab:orange", ls="--", marker="o", ms=10, mfc="none", mew=1.5, zorder=3,
                  label="dense (DynamicCache)"),
    "recompute": dict(color="tab:red", ls="-", marker="^", ms=5, zorder=2, label="sliding window + re-computation"),
    "dense-compiled": dict(color="tab:brown", ls=":", marker="D", ms=6, mfc="none", zorder=3,
                           label="dense, compiled (StaticCache)"),
    "llama.cpp": dict(color="black", ls="--", marker="x", ms=7, zorder=3, label="llama.cpp (same GGUF)"),
}
VARIANT_COLORS = ("tab:purple", "tab:cyan", "tab:olive", "tab:pink", "tab:gray")
STREAMING = ("streaming", "streaming-compiled")
SHORT = {"streaming": "stream", "streaming-compiled": "compiled", "dense": "dense", "dense-compiled": "dense-c",
         "recompute": "recompute", "llama.cpp": "llama.cpp"}
BASELINES = (("dense", "vs_dense"), ("dense-compiled", "vs_dense_compiled"), ("llama.cpp", "vs_llamacpp"))


def _present(rows: Sequence[dict], methods: Sequence[str] | None = None) -> list[str]:
    """The methods of ``rows`` in ``methods``' order (when given), else in the rows' order."""
    seen = list(dict.fromkeys(r["method"] for r in rows))
    return seen if methods is None else [m for m in methods if m in seen]


def _streaming(method: str) -> bool:
    """A streaming arm, at any precision (``streaming@bfloat16+int8``)."""
    return method.partition("@")[0] in STREAMING


def _short(method: str) -> str:
    base, _, label = method.partition("@")
    return SHORT[base] + (f"@{label}" if label else "")


def _style(method: str, variants: list[str]) -> dict:
    """The line style of an arm: its own, or for another precision its arm's in a colour of its own."""
    base, _, label = method.partition("@")
    if not label:
        return STYLES[base]
    color = VARIANT_COLORS[variants.index(label) % len(VARIANT_COLORS)]
    return {**STYLES[base], "color": color, "label": f"{STYLES[base]['label']}, {label}"}


def plot_decode(rows: Sequence[dict], path, title: str | None = None) -> Path:
    """Figure-10-style PNG against cache size, one line per method: per-token latency (log
    scale; the streaming speed-ups over re-computation written above its points), peak memory,
    cache storage and, with a dense arm, each streaming arm's latency relative to dense."""
    plt = pyplot()
    sizes, methods = sorted({r["size"] for r in rows}), _present(rows)
    variants = list(dict.fromkeys(m.partition("@")[2] for m in methods if "@" in m))
    ratios = "dense" in methods and any(_streaming(m) for m in methods)
    fig, axes = plt.subplots(1, 4 if ratios else 3, figsize=(21 if ratios else 16, 4.8))
    keys = ("median_ms", "peak_mib", "state_mib", "vs_dense")
    for m in methods:
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["size"])
        for ax, key in zip(axes, keys):
            if key != "vs_dense" or _streaming(m):
                ax.plot([r["size"] for r in pts], [r[key] for r in pts], **_style(m, variants))
    rec = {r["size"]: r["median_ms"] for r in rows if r["method"] == "recompute"}
    for k, m in enumerate(x for x in STREAMING if x in methods and rec):
        for n, s in speedups(rows, method=m).items():
            axes[0].annotate(f"{s:.0f}x" if s >= 10 else f"{s:.1f}x", (n, rec[n]), textcoords="offset points",
                             xytext=(0, 8 + 11 * k), ha="center", fontsize=8, color=STYLES[m]["color"])
    titles = ["latency (above re-computation: streaming speed-up over it)",
              f"peak memory while decoding ({rows[0]['mem_source'] if rows else ''})", "KV cache tensors",
              "streaming latency relative to dense (median ratio)"]
    labels = ["per-token decode latency (ms, median)", "peak memory (MiB)", "cache storage (MiB)", "latency / dense"]
    for ax, t, y in zip(axes, titles, labels):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set(xlabel="cache size (tokens)", ylabel=y)
        ax.set_title(t, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(lambda v, _: f"{v:g}")  # 0.5, 2, 20 rather than 5x10^-1
    axes[0].yaxis.set_minor_formatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")
    axes[0].margins(y=0.15)
    if ratios:
        axes[3].axhline(1.0, **{k: STYLES["dense"][k] for k in ("color", "ls")}, lw=1, label="dense")
        axes[3].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, title)


def plot_stream(rows: Sequence[dict], path, title: str | None = None) -> Path:
    """Three-panel PNG against tokens streamed, one line per method: per-token latency, process
    memory (CUDA memory allocated where measured, else resident memory) and the cache's storage."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for m in _present(rows, STREAM_METHODS):
        pts = [r for r in rows if r["method"] == m]
        gpu = all(r.get("gpu_mib") is not None for r in pts)
        xs, style = [r["tokens"] for r in pts], {**STYLES[m], "ms": STYLES[m]["ms"] / 2}
        for ax, key in zip(axes, ("median_ms", "gpu_mib" if gpu else "rss_mib", "state_mib")):
            ax.plot(xs, [r[key] for r in pts], **style)
        axes[1].set_ylabel("GPU memory allocated (MiB)" if gpu else "resident memory (MiB)")
    axes[0].set_ylabel("per-token latency (ms, median of each interval)")
    axes[2].set_ylabel("cache storage (MiB)")
    for ax in axes:
        ax.set_xlabel("tokens streamed")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def decode_table(rows: Sequence[dict]) -> str:
    """A terminal table: one line per cache size, the methods side by side, and a legend line."""
    methods = _present(rows)
    by = {(r["size"], r["method"]): r for r in rows}
    cols = []  # (header, method, key, format, unit)
    for m in methods:
        cols += [(f"{_short(m)} ms", m, "median_ms", ".2f", ""), ("p90", m, "p90_ms", ".2f", ""),
                 ("peak MiB", m, "peak_mib", ".0f", "")]
    for m in (x for x in methods if _streaming(x)):
        for arm, key in BASELINES:
            if arm in methods:
                cols.append((f"{_short(m)}/{SHORT[arm]}", m, key, ".3f", ""))
        if "recompute" in methods:
            cols.append((f"{_short(m)} speed-up", m, "speedup_vs_recompute", ".1f", "x"))
        cols.append((f"{_short(m)}/limit", m, "vs_limit", ".2f", ""))

    def cell(n, m, key, fmt, unit):
        v = by.get((n, m), {}).get(key)
        return "-" if v is None else format(v, fmt) + unit

    table = format_table(["size"] + [c[0] for c in cols],
                         [[str(n)] + [cell(n, *c[1:]) for c in cols] for n in sorted({r["size"] for r in rows})],
                         first_left=False)
    return (f"{table}\nms = median per-token latency, p90 = 90th percentile (ms); peak = peak memory with the model "
            f"and that arm only ({rows[0]['mem_source'] if rows else ''}); X/dense = median ratio; "
            "speed-up = recompute median / X median; X/limit = median / the memory-bandwidth limit (weights and "
            "KV read once, at the measured copy bandwidth)")


def batch_table(rows: Sequence[dict]) -> str:
    """A terminal table of :func:`~streamingllm.bench.batch.bench_batch`'s rows, and a legend line."""
    table = format_table(
        ["size", "streams", "ms per step", "p90", "p99", "step / smallest", "tokens/s", "speed-up", "limit ms",
         "vs limit"],
        [[str(r["size"]), str(r["batch"]) + ("" if r["stacked"] or r["batch"] == 1 else " (one by one)"),
          f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['step_ratio']:.2f}",
          f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x", f"{r['limit_ms']:.2f}", f"{r['vs_limit']:.2f}x"]
         for r in rows], first_left=False)
    return (f"{table}\nms per step = median of one step of all the streams (p90, p99: percentiles); step / smallest "
            "and speed-up (tokens/s) against the smallest batch at the same size, from one interleaved run; limit: "
            "the weights and every stream's keys and values read once at the measured copy bandwidth")


def stream_table(result: StreamResult) -> str:
    """A terminal table of the stream samples, then :func:`stream_summary`."""
    gpu = any(r.get("gpu_mib") is not None for r in result.rows)
    header = ["method", "tokens", "median ms", "p90 ms", "RSS MiB"] + ["GPU MiB"] * gpu + ["cache MiB", "cached"]
    rows = [[r["method"], str(r["tokens"]), f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['rss_mib']:.1f}"]
            + ([f"{r['gpu_mib']:.1f}"] if gpu else []) + [f"{r['state_mib']:.2f}", str(r["cached_tokens"])]
            for r in result.rows]
    return format_table(header, rows) + "\n" + stream_summary(result)


def stream_summary(result: StreamResult) -> str:
    """The storage-growth and memory verdict of a stream run, in words."""
    full, end, out = result.full, result.end, []
    if full is None:
        out.append("no streaming arm: no storage check")
    else:
        same = "unchanged (same data pointers and sizes)" if result.storage_unchanged else "CHANGED"
        out.append(f"streaming cache storage growth after it filled (at {full.tokens} tokens): "
                   f"{result.storage_growth_bytes} bytes; storages {same}")
        out.append(f"streaming RSS: {full.rss_mib:.1f} MiB when the cache filled, {end.rss_mib:.1f} MiB at the end "
                   f"({100 * (end.rss_mib - full.rss_mib) / full.rss_mib:+.2f}%)")
        if full.gpu_mib is not None:
            out.append(f"streaming GPU memory allocated: {full.gpu_mib:.1f} MiB when the cache filled, "
                       f"{end.gpu_mib:.1f} MiB at the end")
    if result.dense_stop:
        out.append("dense arm skipped (max_dense_tokens 0)" if result.dense_tokens == 0 else
                   f"dense arm stopped after {result.dense_tokens} tokens ({result.dense_stop})")
    return "\n".join(out)


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
    return (f"{where} | torch {torch.__version__} | transformers {transformers.__version__} | "
            f"{model.config.model_type} {model.config.num_hidden_layers} layers, {model.dtype}{load_average()}")


def load_average() -> str:
    """``", loadavg X"`` (the 1-minute load: other work on the machine skews timings), or ''."""
    return f", loadavg {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
