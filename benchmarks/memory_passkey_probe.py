"""Where the memory's passkey answer goes wrong: is the key's block retrieved, and does the model read it?

Builds the passkey evaluation's stream (``streamingllm passkey``: the same filler, key and question),
reads it with a memory cache of window ``--window-size`` (4 sinks, ``BlockMemory()`` unless told
otherwise), and prints, for the question's last forward, the block that holds the key, how many
layers retrieved it, each layer's retrieved blocks, and the greedy answer; each window twice: the
question read in forwards of its own (as the evaluation reads it) and read on in the context's
chunks. Run in the project's venv:

    python benchmarks/memory_passkey_probe.py --window-size 1020 252 --total-tokens 8192 --depth 0.5
"""

from __future__ import annotations

import argparse

import torch

from streamingllm import BlockMemory, load
from streamingllm.cli.recall import encoder, stream_start
from streamingllm.evals.passkey import passkey_prompt
from streamingllm.evals.perplexity import Setting
from streamingllm.evals.readers import make_reader
from streamingllm.models import DEFAULT_MODEL


def probe(model, tokenizer, window: int, total: int, depth: float, key: str, memory: BlockMemory,
          apart: bool) -> dict:
    """One stream: the key's block, the layers that retrieved it at the question, and the answer.
    ``apart``: the question read in forwards of its own, as the evaluation reads it (its lookup made
    from the question's queries alone); else read on from the context in the same chunks (the
    question's last chunk begins with the context's last tokens)."""
    encode, decode = encoder(tokenizer)
    prompt = passkey_prompt(encode, total, depth, key, stream_start(tokenizer))
    reader = make_reader(model, Setting("memory", 4, window, memory=memory))
    if apart:
        reader.feed(prompt.context)
        reader.feed(prompt.question)
    else:
        reader.feed(prompt.context + prompt.question)
    retrieved = reader.cache.retrieved()
    block = (prompt.key_at - 4) // memory.block_size  # evicted tokens fill blocks in stream order after the sinks
    answer = []
    for _ in range(8):
        answer.append(int(reader.logits.argmax()))
        reader.feed(answer[-1:])
    return {"window": window, "key_block": block, "blocks": len(reader.cache.layers[0].store),
            "layers_with_key_block": sum(block in b for b in retrieved.values()), "layers": len(retrieved),
            "answer": decode(answer), "retrieved": retrieved}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--window-size", type=int, nargs="+", default=[1020, 252], help="W of the memory cache (4 sinks)")
    p.add_argument("--total-tokens", type=int, default=8192)
    p.add_argument("--depth", type=float, default=0.5, help="where the key sits (fraction)")
    p.add_argument("--key", default="15306", help="the pass key (the evaluation's key at depth 0.5, seed 0)")
    p.add_argument("--memory-blocks", type=int, default=4, help="blocks retrieved (top_k)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    a = p.parse_args(argv)
    model, tokenizer = load(a.model)
    with torch.no_grad():
        for window in a.window_size:
            for apart in (True, False):
                r = probe(model, tokenizer, window, a.total_tokens, a.depth, a.key, BlockMemory(top_k=a.memory_blocks),
                          apart)
                how = "question apart (as evaluated)" if apart else "question joined to the context's last chunk"
                print(f"window {r['window']}, {how}: key in block {r['key_block']} of {r['blocks']}, retrieved "
                      f"by {r['layers_with_key_block']} of {r['layers']} layers; answer {r['answer']!r}", flush=True)
                print("  first layers' blocks:", {i: b for i, b in list(r["retrieved"].items())[:6]}, flush=True)


if __name__ == "__main__":
    main()
