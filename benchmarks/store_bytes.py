"""Bytes a session store writes per turn: the whole saved state against the turn's delta.

A conversation of ``--turns`` user messages of mixed lengths (passages of Austen's novels, or a
fixed text without the corpus) with short greedy replies runs through one ``Session`` on the
default model. After every turn the session's state (``Session.state()``) is encoded whole (what
the state dir writes) and as the delta from the previous turn's state
(``streamingllm.serve.delta.diff_state``: the slots the turn added, the sinks, the new
messages), and the delta chain is applied to check that it rebuilds the live state bit for bit.
Prints a table per turn and the summary (mean, median, p95 bytes per turn each way, and the
ratios), and writes ``store_bytes.csv`` and ``store_bytes.png`` into ``--out``. A turn with a
rebase (every window key rotated) writes about the whole window. ``--memory`` gives the session a
memory of evicted blocks (``BlockMemory()``, whole exchanges evicted into it): its whole state grows
with the conversation, its delta holds the turn's new blocks. Run from the repository root:

    . .venv/bin/activate && python benchmarks/store_bytes.py --turns 40 --max-tokens 32 --out docs/bench/
    . .venv/bin/activate && python benchmarks/store_bytes.py --memory --window-size 252 --turns 40 --max-tokens 32 \
        --out docs/bench/memory/store_bytes
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from streamingllm import BlockMemory, load
from streamingllm.evals.corpus import CorpusError, austen_text
from streamingllm.models import DEFAULT_MODEL
from streamingllm.report import format_table, pyplot, save_figure, write_csv
from streamingllm.serve.delta import apply_delta, diff_state, encode, rebased, states_equal
from streamingllm.session import Session

WORDS_PER_MESSAGE = (5, 20, 60, 200)  # mixed user-message lengths (words)
FALLBACK = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
            "in want of a wife. However little known the feelings or views of such a man may be on his first "
            "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
            "he is considered the rightful property of some one or other of their daughters.")
COLUMNS = ["turn", "user_words", "tokens_added", "seen_tokens", "whole_bytes", "delta_bytes", "ratio", "rebase",
           "diff_ms"]


def user_messages(turns: int, corpus: str, seed: int) -> list[str]:
    """``turns`` user messages, each a passage of one of :data:`WORDS_PER_MESSAGE` lengths (drawn
    with ``seed``), from Austen's novels (``corpus="austen"``, when available) or a fixed text."""
    words = []
    if corpus == "austen":
        try:
            words = austen_text().split()
        except CorpusError as err:
            print(f"the Austen corpus is not available ({err}); using a fixed text")
    words = words or FALLBACK.split() * 40
    rng = random.Random(seed)
    out = []
    for _ in range(turns):
        n = rng.choice(WORDS_PER_MESSAGE)
        at = rng.randrange(max(1, len(words) - n))
        out.append("Say in a few words what this is about: " + " ".join(words[at : at + n]))
    return out


def run(args) -> list[dict]:
    """One row per turn (:data:`COLUMNS`); checks that the chained deltas rebuild every state."""
    model, tokenizer = load(args.model)
    memory = dict(memory=BlockMemory(), evict="turns") if args.memory else {}
    session = Session(model, tokenizer, args.sink_size, args.window_size, system="Answer in one short sentence.",
                      max_new_tokens=args.max_tokens, **memory)
    prev = rebuilt = None
    rows, seen = [], 0
    for turn, text in enumerate(user_messages(args.turns, args.corpus, args.seed), 1):
        "".join(session.reply(text))
        state = session.state()
        start = time.perf_counter()
        delta = diff_state(prev, state)
        diff_ms = 1000 * (time.perf_counter() - start)
        rebuilt = apply_delta(rebuilt, delta)
        if not states_equal(rebuilt, state):
            raise AssertionError(f"turn {turn}: the chained deltas do not rebuild the state")
        whole, part = len(encode(state)), len(encode(delta))
        added = session.cache.seen_tokens - seen
        seen = session.cache.seen_tokens
        rows.append({"turn": turn, "user_words": len(text.split()), "tokens_added": added,
                     "seen_tokens": seen, "whole_bytes": whole, "delta_bytes": part, "ratio": whole / part,
                     "rebase": int(not args.memory and rebased(prev, state)), "diff_ms": diff_ms})
        prev = state
    return rows


def summary(rows: list[dict]) -> list[list[str]]:
    """Mean, median and p95 bytes per turn, whole and delta, and their ratio (the first turn,
    which has no previous state, left out)."""
    later = rows[1:] or rows
    out = []
    for name, stat in (("mean", statistics.fmean), ("median", statistics.median),
                       ("p95", lambda xs: sorted(xs)[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))])):
        whole, part = (stat([r[k] for r in later]) for k in ("whole_bytes", "delta_bytes"))
        out.append([name, f"{whole / 1e6:.3f}", f"{part / 1e6:.3f}", f"{whole / part:.1f}"])
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    turns = [r["turn"] for r in rows]
    ax.plot(turns, [r["whole_bytes"] / 1e6 for r in rows], "o-", ms=3, label="whole state")
    ax.plot(turns, [r["delta_bytes"] / 1e6 for r in rows], "o-", ms=3, label="delta")
    rebases = [r for r in rows if r["rebase"]]
    ax.plot([r["turn"] for r in rebases], [r["delta_bytes"] / 1e6 for r in rebases], "x", color="red", ms=8,
            label="rebase (window keys rotated)")
    ax.set(xlabel="turn", ylabel="MB written", yscale="log")
    ax.legend(fontsize=8)
    save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sink-size", type=int, default=4)
    p.add_argument("--window-size", type=int, default=1020)
    p.add_argument("--turns", type=int, default=40, help="user messages in the conversation")
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens per (greedy) reply")
    p.add_argument("--corpus", choices=("austen", "fixed"), default="austen", help="where the user messages come from")
    p.add_argument("--seed", type=int, default=0, help="seed of the message lengths and passages")
    p.add_argument("--memory", action="store_true", help="a memory of evicted blocks, whole exchanges evicted into it")
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    a = p.parse_args(argv)
    rows = run(a)
    print(format_table(COLUMNS, [[f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS]
                                 for r in rows]))
    print()
    print(format_table(["bytes per turn", "whole MB", "delta MB", "whole / delta"], summary(rows)))
    write_csv(rows, a.out / "store_bytes.csv", COLUMNS)
    what = f"cache {a.sink_size}+{a.window_size}" + (" + memory k4x128" if a.memory else "")
    plot(rows, a.out / "store_bytes.png", f"{a.model}, {what}: bytes written per turn")
    print(f"wrote {a.out / 'store_bytes.csv'} and {a.out / 'store_bytes.png'}")


if __name__ == "__main__":
    main()
