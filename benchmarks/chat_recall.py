"""Multi-turn recall through the server: facts told at turns 1-5, asked at turns 30-39.

For each configuration a ``streamingllm serve`` is started on loopback (default model, pinned system
prompt, cache 4+252 per session), and one conversation is run through the ``openai`` client: five
facts, then small talk, then each fact asked for (every other turn from turn 30 on), greedy. A
question is answered when the reply contains the fact's keyword. Configurations: token eviction
(StreamingLLM), whole-turn eviction, whole-turn eviction plus the memory of evicted blocks, and a
window holding the whole conversation (the model's own ceiling). Writes chat_recall.csv (every
question and reply) and chat_recall.png, and prints the table. About 8 minutes on 2 CPU cores:

    . .venv/bin/activate && python benchmarks/chat_recall.py --out docs/bench/memory/chat_recall
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from launch import start_server, stop_server

SYSTEM = "You are a helpful assistant with a good memory. Answer in one short sentence."
FACTS = [("My name is Alice.", "What is my name?", "alice"),
         ("My dog is called Rex.", "What is my dog called?", "rex"),
         ("I live in Lisbon.", "In which city do I live?", "lisbon"),
         ("My favourite colour is green.", "What is my favourite colour?", "green"),
         ("I work as a baker.", "What is my job?", "baker")]
SMALL_TALK = ["Tell me a fun fact about the ocean.", "What is a good name for a cat?", "How do plants grow?",
              "Give me a tip for sleeping well.", "What is the capital of Japan?", "Why is the sky blue?",
              "Suggest a healthy breakfast.", "What is two plus three?", "Name a famous painter.",
              "How many legs does a spider have?", "What do bees make?", "Recommend a board game.",
              "What is the tallest mountain?", "How do I boil an egg?", "What is a synonym for happy?",
              "Which planet is the red one?", "What language is spoken in Brazil?", "Tell me a short joke.",
              "What is the largest animal?", "How many days are in a leap year?", "What is ice made of?",
              "Name a fruit that is yellow.", "What does a thermometer measure?", "Who wrote Hamlet?"]
CONFIGS = {
    "token eviction": ["--window-size", "252"],
    "turn eviction": ["--window-size", "252", "--evict", "turns"],
    "turn eviction + memory": ["--window-size", "252", "--evict", "turns", "--memory", "--block-size", "32",
                               "--memory-blocks", "4", "--lookup-chunk", "32"],
    "token eviction + memory": ["--window-size", "252", "--memory", "--block-size", "32", "--memory-blocks", "4",
                                "--lookup-chunk", "32"],
    "whole conversation in view": ["--window-size", "4092"],
}


def script() -> list[tuple[str, str | None]]:
    """The user's turns: ``(message, keyword)``, the keyword set on the questions."""
    turns: list[tuple[str, str | None]] = [(fact, None) for fact, _, _ in FACTS]
    turns += [(t, None) for t in SMALL_TALK]  # turns 6-29
    for (_, question, keyword), filler in zip(FACTS, SMALL_TALK):
        turns += [(question, keyword), (filler, None)]  # turns 30-39
    return turns


def converse(url: str, max_tokens: int) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    import httpx

    sid = httpx.post(f"{url}/v1/sessions", json={"pin_system": True}, timeout=60).json()["id"]
    model = client.models.list().data[0].id
    conv, rows = [{"role": "system", "content": SYSTEM}], []
    for turn, (message, keyword) in enumerate(script(), 1):
        conv.append({"role": "user", "content": message})
        r = client.chat.completions.create(model=model, messages=conv, temperature=0, max_tokens=max_tokens,
                                           extra_body={"session_id": sid, "repetition_penalty": 1.05})
        reply = r.choices[0].message.content
        conv.append({"role": "assistant", "content": reply})
        if keyword is not None:
            rows.append({"turn": turn, "question": message, "keyword": keyword, "reply": reply,
                         "recalled": keyword in reply.lower(), "seen_tokens": r.session["seen_tokens"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG")
    p.add_argument("--max-tokens", type=int, default=32, help="reply length limit (tokens)")
    p.add_argument("--out", type=Path, default=Path("chat_recall"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in a.configs:
        proc, url = start_server(*CONFIGS[name])
        try:
            rows = converse(url, a.max_tokens)
        finally:
            stop_server(proc)
        results += [{"config": name, **r} for r in rows]
        hits = sum(r["recalled"] for r in rows)
        print(f"{name:>28}: {hits}/{len(rows)} facts recalled at turns 30-39 "
              f"({rows[-1]['seen_tokens']} tokens into the conversation)", flush=True)
    with open(a.out / "chat_recall.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(results[0]))
        w.writeheader()
        w.writerows(results)
    from streamingllm.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = a.configs
    ax.barh(names, [sum(r["recalled"] for r in results if r["config"] == n) for n in names])
    ax.set(xlabel=f"facts recalled (of {len(FACTS)}), asked 25-34 turns after they were told", xlim=(0, len(FACTS)))
    fig.tight_layout()
    fig.savefig(a.out / "chat_recall.png", dpi=120)
    print(f"wrote {a.out / 'chat_recall.csv'}, {a.out / 'chat_recall.png'}")


if __name__ == "__main__":
    main()
