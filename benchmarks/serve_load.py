"""Load on ``streamingllm serve`` over loopback: N concurrent sessions, streamed chat turns.

Starts the server (the default model), then for each N in --clients (the list repeated --rounds
times, interleaved, so machine noise hits every N alike) runs N client threads at once, each with a
session of its own doing --turns streamed turns of exactly --reply-tokens tokens (min_tokens =
max_tokens) through the stock ``openai`` client. Reports per N (median over rounds): aggregate
generated tokens/s, p50/p99 time to first token and per-token latency (gaps between streamed
chunks), errors, and the server's resident memory; the throughput ratio to N = 1. Bounded: every
request has a timeout and the run stops after --max-seconds.

    python benchmarks/serve_load.py --clients 1 4 8 --rounds 2 --turns 3 --reply-tokens 32 --out bench_out/serve_load
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
from launch import start_server, stop_server

from streamingllm.report import format_table, pyplot, save_figure, write_csv

MODEL = "smollm2-135m"


def rss_mib(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1]) / 2**20
    return float("nan")


def client(url: str, i: int, args, out: dict) -> None:
    """One user: a session, --turns streamed turns; records TTFT, chunk gaps, tokens, errors."""
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=args.request_timeout)
    sid = httpx.post(f"{url}/v1/sessions", json={}, timeout=30).json()["id"]
    messages = [{"role": "system", "content": "You are a storyteller."}]
    for turn in range(args.turns):
        messages.append({"role": "user", "content": f"Client {i}, part {turn}: tell the next part of a story about a "
                                                    f"lighthouse keeper and a storm."})
        t0 = time.perf_counter()
        last, text, tokens = None, [], 0
        try:
            stream = c.chat.completions.create(model=MODEL, messages=messages, stream=True, temperature=0,
                                               max_tokens=args.reply_tokens, stream_options={"include_usage": True},
                                               extra_body={"session_id": sid, "min_tokens": args.reply_tokens})
            for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].delta.content:
                    if last is None:
                        out["ttft"].append(now - t0)
                    else:
                        out["gaps"].append(now - last)
                    last = now
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        except Exception as err:  # counted, never raised: a load test reports errors
            out["errors"].append(f"{type(err).__name__}: {err}")
            return
        out["tokens"] += tokens
        messages.append({"role": "assistant", "content": "".join(text)})


def run_level(url: str, n: int, args) -> dict:
    out = {"ttft": [], "gaps": [], "errors": [], "tokens": 0}
    threads = [threading.Thread(target=client, args=(url, i, args, out)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.max_seconds)
    wall = time.perf_counter() - t0
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))  # noqa: E731
    return {"clients": n, "tokens": out["tokens"], "seconds": wall, "tokens_per_s": out["tokens"] / wall,
            "ttft_p50_ms": 1e3 * q(out["ttft"], 50), "ttft_p99_ms": 1e3 * q(out["ttft"], 99),
            "token_p50_ms": 1e3 * q(out["gaps"], 50), "token_p99_ms": 1e3 * q(out["gaps"], 99),
            "errors": len(out["errors"]), "rss_mib": rss_mib(url), "first_error": (out["errors"] or [""])[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--sink-size", type=int, default=4)
    p.add_argument("--window-size", type=int, default=252)
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--max-seconds", type=float, default=900)
    p.add_argument("--out", type=Path, default=Path("bench_out/serve_load"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    proc, url = start_server("--sink-size", str(args.sink_size), "--window-size", str(args.window_size),
                                 "--max-batch", str(max(args.clients)))
    rows, started = [], time.monotonic()
    try:
        run_level(url, 1, argparse.Namespace(**{**vars(args), "turns": 1}))  # warm-up
        for r in range(args.rounds):
            for n in args.clients:
                if time.monotonic() - started > args.max_seconds:
                    break
                row = run_level(url, n, args)
                row["round"] = r
                rows.append(row)
                print(f"round {r} N={n}: {row['tokens_per_s']:.1f} tok/s, errors {row['errors']}", file=sys.stderr)
    finally:
        stop_server(proc)
    cols = ["round", "clients", "tokens", "seconds", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "token_p50_ms",
            "token_p99_ms", "errors", "rss_mib", "first_error"]
    write_csv(rows, args.out / "runs.csv", cols)
    summary = []
    for n in args.clients:
        mine = [r for r in rows if r["clients"] == n]
        if mine:
            summary.append({k: statistics.median(r[k] for r in mine) for k in cols[1:-1] if k != "round"} | {"clients": n})
    base = summary[0]["tokens_per_s"] or float("nan")
    for s in summary:
        s["speedup_vs_1"] = s["tokens_per_s"] / base
    write_csv(summary, args.out / "summary.csv", ["clients", "tokens_per_s", "speedup_vs_1", "ttft_p50_ms", "ttft_p99_ms",
                                                  "token_p50_ms", "token_p99_ms", "errors", "rss_mib"])
    print(format_table(["clients", "tok/s", "x N=1", "TTFT p50/p99 ms", "token p50/p99 ms", "errors", "RSS MiB"],
                       [[str(s["clients"]), f"{s['tokens_per_s']:.1f}", f"{s['speedup_vs_1']:.2f}",
                         f"{s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f}", f"{s['token_p50_ms']:.0f} / {s['token_p99_ms']:.0f}",
                         f"{s['errors']:.0f}", f"{s['rss_mib']:.0f}"] for s in summary]))
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ns = [s["clients"] for s in summary]
    a.plot(ns, [s["tokens_per_s"] for s in summary], "o-")
    a.set(xlabel="concurrent sessions", ylabel="aggregate tokens/s", title="throughput", xticks=ns)
    b.plot(ns, [s["token_p50_ms"] for s in summary], "o-", label="per token p50")
    b.plot(ns, [s["token_p99_ms"] for s in summary], "o--", label="per token p99")
    b.plot(ns, [s["ttft_p50_ms"] for s in summary], "s-", label="first token p50")
    b.set(xlabel="concurrent sessions", ylabel="ms", title="latency", xticks=ns)
    b.legend()
    save_figure(fig, args.out / "serve_load.png",
                f"streamingllm serve, {MODEL}, cache {args.sink_size}+{args.window_size}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
