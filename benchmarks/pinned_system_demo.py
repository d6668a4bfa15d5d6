"""Does the system prompt still govern the answers after 20,000 tokens? Pinned vs not, through the server.

Starts ``streamingllm serve`` (the default model, a --sink-size + --window-size cache per session)
and scripts the same long conversation through two sessions, one created with
``{"pin_system": true}`` and one without: the same system prompt, then turns that each paste
about --passage-tokens tokens of Austen's novels and ask for a one-line reply, until the
conversation passes --total-tokens. Every --probe-every tokens both sessions are asked
--question (greedy), and their answers are printed side by side and written to ``--out``/answers.csv.
Without pinning, the system prompt is evicted once the conversation outgrows the window; pinned,
its tokens are the attention sinks and are never evicted.

    python benchmarks/pinned_system_demo.py --total-tokens 20000 --out bench_out/pinned
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from launch import start_server, stop_server

from streamingllm.evals.corpus import austen_text
from streamingllm.report import format_table, write_csv

MODEL = "smollm2-135m"
SYSTEM = "You are Captain Zorblat, a space pirate. Your name is Captain Zorblat."
QUESTION = "What is your name?"


class Conversation:
    """One session's side of the script: the messages so far, sent whole each turn (the server
    feeds only the new ones)."""

    def __init__(self, url: str, pin: bool):
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        self.sid = httpx.post(f"{url}/v1/sessions", json={"pin_system": pin}, timeout=30).json()["id"]
        self.messages = [{"role": "system", "content": SYSTEM}]
        self.seen = 0
        self.session: dict = {}  # the server's numbers after the last turn

    def say(self, text: str, max_tokens: int) -> str:
        self.messages.append({"role": "user", "content": text})
        r = self.client.chat.completions.create(model=MODEL, messages=self.messages, temperature=0, max_tokens=max_tokens,
                                                extra_body={"session_id": self.sid})
        reply = r.choices[0].message.content
        self.messages.append({"role": "assistant", "content": reply})
        self.session = r.session
        self.seen = r.session["seen_tokens"]
        return reply


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total-tokens", type=int, default=20000)
    p.add_argument("--passage-tokens", type=int, default=900, help="about this many tokens of text per turn")
    p.add_argument("--probe-every", type=int, default=5000)
    p.add_argument("--sink-size", type=int, default=4)
    p.add_argument("--window-size", type=int, default=1020)
    p.add_argument("--out", type=Path, default=Path("bench_out/pinned"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    words = austen_text().split()
    chunk = int(args.passage_tokens * 0.75)  # words per passage (about 1.3 tokens a word)
    proc, url = start_server("--sink-size", str(args.sink_size), "--window-size", str(args.window_size))
    rows = []
    try:
        sides = {"pinned": Conversation(url, True), "not pinned": Conversation(url, False)}
        pool = ThreadPoolExecutor(2)  # both sessions at once: the server batches their steps

        def probe():
            answers = dict(zip(sides, pool.map(lambda c: c.say(QUESTION, 24), sides.values())))
            row = {"tokens": min(c.seen for c in sides.values()), **answers}
            rows.append(row)
            print(f"[{row['tokens']} tokens] pinned: {row['pinned']!r} | not pinned: {row['not pinned']!r}",
                  file=sys.stderr, flush=True)

        probe()
        turn, next_probe = 0, args.probe_every
        while min(c.seen for c in sides.values()) < args.total_tokens:
            passage = " ".join(words[turn * chunk : (turn + 1) * chunk])
            text = f"Here is a passage from a novel:\n\n{passage}\n\nSay in one short sentence what happens."
            list(pool.map(lambda c: c.say(text, 24), sides.values()))
            turn += 1
            if min(c.seen for c in sides.values()) >= next_probe:
                probe()
                next_probe += args.probe_every
        if rows[-1]["tokens"] < args.total_tokens:
            probe()
    finally:
        stop_server(proc)
    write_csv(rows, args.out / "answers.csv", ["tokens", "pinned", "not pinned"])
    print(format_table(["tokens seen", f"pinned: {QUESTION}", "not pinned"],
                       [[str(r["tokens"]), r["pinned"], r["not pinned"]] for r in rows]))
    for name, c in sides.items():
        s = c.session
        print(f"{name}: {s['pinned_tokens']} pinned system-prompt tokens, cache {s['cached_tokens']}/"
              f"{s['max_cached_tokens']} tokens, {s['seen_tokens']} seen", file=sys.stderr)


if __name__ == "__main__":
    main()
