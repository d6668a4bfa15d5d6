"""Issue 9's GPU checks, as one script for a machine with CUDA (run with a timeout; writes to --out).

1. Precision drift on CUDA in float32/bfloat16/float16 against the float64 twin on the CPU
   (benchmarks/precision_drift.py): early (1k-3k) vs late (25k-30k) tokens, and dense before eviction.
2. ``device_map`` over one GPU and the CPU (layer 0 on cuda:0, layer 1 on the CPU): decoding and
   exact chunks against the same weights on the CPU alone, fed token by token (the definition of
   exactness, held to the tests' slow reference by tests/core).
3. The prepared, compiled decode step on CUDA against eager.
4. The memory of evicted blocks (MemoryCache) on CUDA against the same cache on the CPU over 3,000
   evicting tokens (same blocks retrieved), and a state saved on CUDA, restored into a new cache
   before its first forward (it is read onto the CPU), continuing exactly.

    python benchmarks/gpu_exactness.py --out "$OUT" [--tokens 30000]

The GPU machine's transformers may be older than the supported range: install a supported wheel
carried along first (pip install --no-deps transformers-5.24.0-py3-none-any.whl).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, however this one is started
from precision_drift import VOCAB, drift, tiny_llama  # noqa: E402

from streamingllm import SinkCache  # noqa: E402
from streamingllm.feed import prefill  # noqa: E402
from streamingllm.report import write_csv  # noqa: E402


def reference_logits(model, ids, S, W):
    """Every token's logits, ``ids`` fed one by one through an S + W cache on ``model``'s device."""
    return prefill(model, SinkCache(model, S, W), ids, chunk_size=1, return_all_logits=True)


def device_map_check(device: str) -> dict:
    """Layer 0 on ``device``, layer 1 and the head on the CPU."""
    from accelerate import dispatch_model

    cpu = tiny_llama()
    ref = reference_logits(cpu, ids := torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(1)), 4, 28)
    split = dispatch_model(tiny_llama(), device_map={"model.embed_tokens": device, "model.layers.0": device,
                                                            "model.layers.1": "cpu", "model.norm": "cpu",
                                                            "model.rotary_emb": device, "lm_head": "cpu"})
    cache = SinkCache(split, 4, 28, rebase_every=40)
    got = torch.cat([prefill(split, cache, ids[:, :120].to(device), chunk_size=16, return_all_logits=True).cpu(),
                     prefill(split, cache, ids[:, 120:].to(device), chunk_size=1, return_all_logits=True).cpu()], 1)
    devices = sorted({str(l.keys.device) for l in cache.layers})
    return {"check": "device_map", "max_abs_diff": (got - ref).abs().max().item(), "devices": " ".join(devices)}


def compiled_check(device: str) -> dict:
    model = tiny_llama().to(device)
    ids = torch.randint(0, VOCAB, (1, 400), generator=torch.Generator().manual_seed(2)).to(device)
    eager = SinkCache(model, 4, 60, rebase_every=100)
    a = prefill(model, eager, ids, chunk_size=1, return_all_logits=True)
    cache = SinkCache(model, 4, 60, rebase_every=100)
    prefill(model, cache, ids[:, :80], chunk_size=1)
    step = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
    out, t0 = [], time.perf_counter()
    with torch.no_grad():
        for t in range(80, 400):
            pos = cache.prepare_decode_step()
            out.append(step(input_ids=ids[:, t : t + 1], cache=cache, position_ids=pos).logits.clone())
    return {"check": "compiled_step", "max_abs_diff": (torch.cat(out, 1) - a[:, 80:]).abs().max().item(),
            "seconds": time.perf_counter() - t0}


def memory_check(device: str) -> dict:
    """MemoryCache on ``device`` against the CPU, float32; and a restored state continuing there."""
    from streamingllm import BlockMemory, MemoryCache

    memory = BlockMemory(block_size=16, top_k=3, repr_keys=4, chunk_size=16)
    ids = torch.randint(0, VOCAB, (1, 3000), generator=torch.Generator().manual_seed(3))
    cpu, gpu = tiny_llama(), tiny_llama().to(device)
    ref_cache, cache = MemoryCache(cpu, 4, 60, memory), MemoryCache(gpu, 4, 60, memory)
    ref = prefill(cpu, ref_cache, ids[:, :2900], chunk_size=16, return_all_logits=True)
    got = prefill(gpu, cache, ids[:, :2900].to(device), chunk_size=16, return_all_logits=True).cpu()
    same_blocks = ref_cache.retrieved() == cache.retrieved()
    restored = MemoryCache(gpu, 4, 60, memory)
    restored.load_state_dict(cache.state_dict())
    a = prefill(gpu, cache, ids[:, 2900:].to(device), chunk_size=1, return_all_logits=True)
    b = prefill(gpu, restored, ids[:, 2900:].to(device), chunk_size=1, return_all_logits=True)
    lp = lambda x: torch.log_softmax(x.double(), -1)  # noqa: E731
    return {"check": "memory_cache", "max_abs_logp_diff": (lp(got) - lp(ref)).abs().max().item(),
            "same_blocks": same_blocks, "blocks": cache.memory_blocks,
            "restored_max_abs_diff": (a - b).abs().max().item()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=30000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    late = (max(args.tokens - 5000, 3000), args.tokens)
    rows = []
    for name in ("float32", "bfloat16", "float16"):
        rows.append({"device": args.device, **drift(getattr(torch, name), args.tokens, late=late, device=args.device)})
        print(json.dumps(rows[-1]), flush=True)
        write_csv(rows, args.out / "drift.csv", list(rows[0]))
    checks = []
    for check in (device_map_check, compiled_check, memory_check):
        try:
            checks.append(check(args.device))
        except Exception as error:  # keep the other results
            checks.append({"check": check.__name__, "error": f"{type(error).__name__}: {error}"[:500]})
        print(json.dumps(checks[-1]), flush=True)
    (args.out / "checks.json").write_text(json.dumps(checks, indent=1))


if __name__ == "__main__":
    main()
