"""Does low precision drift as a stream grows? Mean |logit error| against a float64 twin, early vs late.

A tiny random Llama (:func:`tiny_llama`, the tests' ``tiny_model("llama")``) streams random
tokens through a 4+124 SinkCache in each dtype, beside the same weights in float64. Tokens in the
measured windows are fed one by one (the decode path: ring, rotations, rebases); the tokens
between them go in exact chunks. Also printed: the same dtype with dense attention over the
tokens before the first eviction.

    python benchmarks/precision_drift.py --dtypes bfloat16 float16 float32 --tokens 30000 --csv drift.csv

Criterion (issue 9): late (25k-30k) within 5% of early (1k-3k), and no worse than dense before eviction.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from streamingllm import SinkCache
from streamingllm.feed import prefill
from streamingllm.report import format_table, write_csv

S, W = 4, 124
VOCAB = 97


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A 2-layer random Llama in eval mode (hidden 32; 4 heads of 128 over 2 key/value heads, as
    LlamaConfig's default head_dim survives in the tests' builder; vocabulary 97), its matrices
    scaled by 4 so attention is far from uniform and errors show: the same config and weights as
    the tests' ``tiny_model("llama")``, so the figures in docs/results.md reproduce."""
    torch.manual_seed(seed)
    config = LlamaConfig(num_key_value_heads=2, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         head_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1 << 20,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(4.0)
    return model


def _one_by_one(model, cache, ids):
    ids = ids.to(model.device)
    if isinstance(cache, SinkCache):
        return prefill(model, cache, ids, chunk_size=1, return_all_logits=True)[0].double().cpu()
    with torch.no_grad():
        return torch.cat([model(ids[:, t : t + 1], cache=cache).logits[0] for t in range(ids.shape[1])]).double().cpu()


def drift(dtype: torch.dtype, tokens: int, early=(1000, 3000), late=(25000, 30000), device="cpu") -> dict:
    """Mean |logit error| of ``dtype`` on ``device`` against the float64 twin on the CPU: dense before
    eviction, streaming over ``early`` and over ``late`` (token ranges)."""
    model64 = tiny_llama(torch.float64)
    model = copy.deepcopy(model64).to(dtype=dtype, device=device)
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))
    row = {"dtype": str(dtype).removeprefix("torch.")}
    # dense, before any eviction: the model's own error in this dtype
    a = _one_by_one(model, DynamicCache(config=model.config), ids[:, : S + W])
    b = _one_by_one(model64, DynamicCache(config=model64.config), ids[:, : S + W])
    row["dense_before_eviction"] = (a - b).abs().mean().item()
    caches = SinkCache(model, S, W), SinkCache(model64, S, W)
    done = 0
    for name, (lo, hi) in (("early", early), ("late", late)):
        hi = min(hi, tokens)
        for m, c in zip((model, model64), caches):
            if lo > done:
                prefill(m, c, ids[:, done:lo].to(m.device), chunk_size=256)
        a, b = (_one_by_one(m, c, ids[:, lo:hi]) for m, c in zip((model, model64), caches))
        row[f"stream_{name}"] = (a - b).abs().mean().item()
        done = hi
    row["late_over_early"] = row["stream_late"] / row["stream_early"]
    row["late_over_dense"] = row["stream_late"] / row["dense_before_eviction"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, default=30000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = [drift(getattr(torch, d), args.tokens, device=args.device) for d in args.dtypes]
    columns = list(rows[0])
    print(format_table(columns, [[r["dtype"]] + [f"{r[c]:.4g}" for c in columns[1:]] for r in rows]), flush=True)
    if args.csv:
        write_csv(rows, args.csv, columns)


if __name__ == "__main__":
    main()
