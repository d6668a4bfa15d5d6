"""Load on ``streamingllm serve --replicas N`` with every session in Redis: S concurrent sessions,
T turns each of mixed lengths, streamed; errors, each replica's memory over the run, and the figures
the sizing table in docs/serving.md is derived from.

Starts Debian's redis-server (append-only file, fsync at every write) and the server on a local
Ray cluster, then one client thread per session: each turn sends the whole conversation (as an
OpenAI client does) with a user message of --user-words words (cycled) and asks for exactly
--reply-tokens tokens (cycled; min_tokens = max_tokens), streamed. A sampler reads /metrics every
--sample-every seconds: each replica's resident memory, cache bytes and sessions. Reported:

* errors (any status but 200, any error event), and which replica served each turn (affinity:
  a session's turns on one replica);
* per replica: turns, generated tokens/s over the run, resident memory from when its sessions'
  windows are full (cache fill 98%: each turn then evicts what it adds) to the end (flat: the
  difference, and the range between);
* Redis: bytes it received per turn (``INFO stats`` total_net_input_bytes: turn commits, leases,
  everything) and bytes it holds per session (``used_memory``).

On 2 CPU cores two replicas share the cores, so the tokens/s say how this machine divides, not what
a replica does on a machine of its own (docs/serving.md says which sizing figures are measured).

    python benchmarks/replicas_load.py --replicas 2 --sessions 8 --turns 30 --out docs/bench/replicas_load
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from launch import start_redis, start_server, stop_server

from streamingllm.report import format_table, pyplot, save_figure, write_csv

MODEL = "smollm2-135m"
WORDS = ("river stone lantern harbor meadow copper violin orchard glacier ember quartz willow falcon "
         "saffron canyon").split()


def user_message(session: int, turn: int, words: int) -> str:
    body = " ".join(WORDS[(session * 7 + turn * 3 + k) % len(WORDS)] for k in range(words))
    return f"Session {session}, turn {turn}: remember these words and answer briefly. {body}"


def session_client(url: str, i: int, args, log: list, progress: list) -> None:
    """One user: a session and --turns streamed turns; each turn's outcome appended to ``log``."""
    http = httpx.Client(base_url=url, timeout=args.request_timeout)
    try:
        r = http.post("/v1/sessions", json={})
        r.raise_for_status()
        sid = r.json()["id"]
    except httpx.HTTPError as err:
        log.append({"session": i, "turn": -1, "status": "error", "error": f"create: {err}"})
        return
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    for turn in range(args.turns):
        words = args.user_words[turn % len(args.user_words)]
        reply_tokens = args.reply_tokens[(turn + i) % len(args.reply_tokens)]
        messages.append({"role": "user", "content": user_message(i, turn, words)})
        body = {"model": MODEL, "messages": messages, "stream": True, "temperature": 0, "max_tokens": reply_tokens,
                "min_tokens": reply_tokens, "session_id": sid, "stream_options": {"include_usage": True}}
        row = {"session": i, "turn": turn, "user_words": words, "reply_tokens": reply_tokens, "status": "ok",
               "error": "", "replica": "", "tokens": 0, "seconds": 0.0, "ttft_s": float("nan")}
        t0, text = time.perf_counter(), []
        try:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                row["replica"] = r.headers.get("x-streamingllm-replica", "")
                if r.status_code != 200:
                    r.read()
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        raise RuntimeError(f"error event: {data['error']['message']}")
                    if data.get("usage"):
                        row["tokens"] = data["usage"]["completion_tokens"]
                    for choice in data.get("choices", []):
                        if choice["delta"].get("content"):
                            if not text:
                                row["ttft_s"] = time.perf_counter() - t0
                            text.append(choice["delta"]["content"])
        except (httpx.HTTPError, RuntimeError, ValueError) as err:
            row.update(status="error", error=str(err))
        row["seconds"] = time.perf_counter() - t0
        log.append(row)
        progress[i] = turn + 1
        if row["status"] != "ok":
            return  # a conversation whose turn failed would diverge; the error is what is reported
        messages.append({"role": "assistant", "content": "".join(text)})


def scrape(url: str) -> dict[str, dict[str, float]]:
    """``{replica: {metric: value}}`` of the per-replica gauges the run follows."""
    wanted = ("process_resident_memory_bytes", "streamingllm_kv_cache_bytes", "streamingllm_sessions_resident",
              "streamingllm_cache_fill_ratio")
    out: dict[str, dict[str, float]] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name = line.split("{", 1)[0]
        if name in wanted and 'replica="' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            out.setdefault(replica, {})[name] = float(line.rsplit(" ", 1)[1])
    return out


def sampler(url: str, every: float, stop: threading.Event, progress: list, samples: list) -> None:
    t0 = time.perf_counter()
    while not stop.wait(every):
        try:
            for replica, values in scrape(url).items():
                samples.append({"seconds": time.perf_counter() - t0, "turns_done": min(progress), "replica": replica,
                                "rss_mib": values.get("process_resident_memory_bytes", float("nan")) / 2**20,
                                "kv_mib": values.get("streamingllm_kv_cache_bytes", float("nan")) / 2**20,
                                "sessions": values.get("streamingllm_sessions_resident", float("nan")),
                                "cache_fill": values.get("streamingllm_cache_fill_ratio", float("nan"))})
        except httpx.HTTPError:
            pass


def redis_stats(redis_url: str) -> dict:
    import redis

    r = redis.Redis.from_url(redis_url)
    return {"net_in": r.info("stats")["total_net_input_bytes"], "used": r.info("memory")["used_memory"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--user-words", type=int, nargs="+", default=[12, 60, 25, 150], help="cycled over turns")
    p.add_argument("--reply-tokens", type=int, nargs="+", default=[8, 32, 16], help="cycled over turns")
    p.add_argument("--sink-size", type=int, default=4)
    p.add_argument("--window-size", type=int, default=1020)
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between /metrics scrapes")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=Path("bench_out/replicas_load"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, redis_url = start_redis(tmp)
        proc, url = start_server("--replicas", str(args.replicas), "--session-store", redis_url,
                                 "--sink-size", str(args.sink_size), "--window-size", str(args.window_size),
                                 "--max-batch", str(args.sessions), "--replica-cpus", str(max(1, os.cpu_count() //
                                                                                              args.replicas)),
                                 wait_s=900)
        log, samples, progress = [], [], [0] * args.sessions
        try:
            before = redis_stats(redis_url)
            stop = threading.Event()
            watcher = threading.Thread(target=sampler, args=(url, args.sample_every, stop, progress, samples))
            watcher.start()
            t0 = time.perf_counter()
            clients = [threading.Thread(target=session_client, args=(url, i, args, log, progress))
                       for i in range(args.sessions)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            wall = time.perf_counter() - t0
            stop.set()
            watcher.join()
            after = redis_stats(redis_url)
        finally:
            stop_server(proc)
            redis_proc.terminate()
    report(args, log, samples, wall, before, after)


def report(args, log: list[dict], samples: list[dict], wall: float, before: dict, after: dict) -> None:
    write_csv(log, args.out / "turns.csv", ["session", "turn", "user_words", "reply_tokens", "status", "replica",
                                            "tokens", "seconds", "ttft_s", "error"])
    write_csv(samples, args.out / "memory.csv", ["seconds", "turns_done", "replica", "rss_mib", "kv_mib", "sessions",
                                                 "cache_fill"])
    ok = [r for r in log if r["status"] == "ok"]
    errors = [r for r in log if r["status"] != "ok"]
    moved = sum(len({r["replica"] for r in ok if r["session"] == s}) > 1 for s in range(args.sessions))
    rows = []
    for replica in sorted({r["replica"] for r in ok}):
        mine = [r for r in ok if r["replica"] == replica]
        mem = [s for s in samples if s["replica"] == replica]
        # from when its sessions' windows are full (each turn then evicts as much as it adds)
        warm = [s for s in mem if s["cache_fill"] >= 0.98 and s["turns_done"] >= 1]
        rows.append({"replica": replica, "sessions": len({r["session"] for r in mine}), "turns": len(mine),
                     "tokens_per_s": sum(r["tokens"] for r in mine) / wall,
                     "token_ms_p50": 1e3 * statistics.median(r["seconds"] / max(1, r["tokens"]) for r in mine),
                     "full_at_turn": warm[0]["turns_done"] if warm else -1,
                     "rss_mib_when_full": warm[0]["rss_mib"] if warm else float("nan"),
                     "rss_mib_end": mem[-1]["rss_mib"] if mem else float("nan"),
                     "rss_growth_mib": (mem[-1]["rss_mib"] - warm[0]["rss_mib"]) if warm else float("nan"),
                     "rss_range_mib_when_full": (max(s["rss_mib"] for s in warm) - min(s["rss_mib"] for s in warm))
                     if warm else float("nan"),
                     "kv_mib_end": mem[-1]["kv_mib"] if mem else float("nan")})
    turns = max(1, len(ok))
    summary = {"replicas": args.replicas, "sessions": args.sessions, "turns_per_session": args.turns,
               "turns_ok": len(ok), "errors": len(errors), "sessions_that_moved": moved, "wall_s": wall,
               "redis_bytes_in_per_turn": (after["net_in"] - before["net_in"]) / turns,
               "redis_bytes_per_session": (after["used"] - before["used"]) / args.sessions}
    write_csv(rows, args.out / "replicas.csv", list(rows[0]) if rows else ["replica"])
    write_csv([summary], args.out / "summary.csv", list(summary))
    print(format_table(["replica", "sessions", "turns", "tok/s", "ms/token p50", "windows full at turn",
                        "RSS MiB then", "RSS MiB end", "growth MiB", "range MiB", "KV MiB"],
                       [[r["replica"], str(r["sessions"]), str(r["turns"]), f"{r['tokens_per_s']:.1f}",
                         f"{r['token_ms_p50']:.0f}", str(r["full_at_turn"]), f"{r['rss_mib_when_full']:.0f}",
                         f"{r['rss_mib_end']:.0f}", f"{r['rss_growth_mib']:+.0f}", f"{r['rss_range_mib_when_full']:.0f}",
                         f"{r['kv_mib_end']:.1f}"] for r in rows]))
    print(f"turns ok {len(ok)}, errors {len(errors)}, sessions that changed replica {moved}, wall {wall:.0f} s; "
          f"Redis received {summary['redis_bytes_in_per_turn'] / 2**20:.2f} MiB per turn and holds "
          f"{summary['redis_bytes_per_session'] / 2**20:.1f} MiB per session")
    if errors:
        print(f"first error: {errors[0]['error']}", file=sys.stderr)
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for replica in sorted({s["replica"] for s in samples}):
        mem = [s for s in samples if s["replica"] == replica]
        a.plot([s["turns_done"] for s in mem], [s["rss_mib"] for s in mem], ".-", label=f"replica {replica}")
        b.plot([s["seconds"] for s in mem], [s["kv_mib"] for s in mem], ".-", label=f"replica {replica}")
    a.set(xlabel="turns completed by every session", ylabel="resident memory (MiB)", title="replica memory")
    b.set(xlabel="seconds", ylabel="KV cache held (MiB)", title="cache held by resident sessions")
    a.legend()
    b.legend()
    save_figure(fig, args.out / "replicas_load.png",
                f"{args.replicas} replicas, {args.sessions} sessions x {args.turns} turns, {MODEL}, cache "
                f"{args.sink_size}+{args.window_size}, sessions in Redis, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
