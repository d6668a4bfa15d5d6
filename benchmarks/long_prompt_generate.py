"""model.generate with a prompt far longer than the cache, on the default model: exact or not?

Feeds the first --prompt-tokens of Austen's novels (Sense and Sensibility) into a --sink-size + --window-size cache
through plain ``model.generate`` (greedy, --new-tokens), three ways, and compares each step's
logits and the NLL of the generated tokens with feeding everything one token at a time:

* ``band`` -- the default: the overflowing prompt forward gets its exact band (sink-aware attention);
* ``fast`` -- ``SinkCache(..., fast_chunks=True)``: the model's plain causal mask (issue 9's
  "approximate without warning" behaviour before the fix).

    python benchmarks/long_prompt_generate.py --prompt-tokens 2000 --sink-size 4 --window-size 252 --new-tokens 100
"""

from __future__ import annotations

import argparse

import torch

from streamingllm import SinkCache, load, prefill
from streamingllm.evals.corpus import austen_text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--sink-size", type=int, default=4)
    parser.add_argument("--window-size", type=int, default=252)
    parser.add_argument("--new-tokens", type=int, default=100)
    args = parser.parse_args(argv)
    model, tokenizer = load()
    ids = tokenizer(austen_text()[:40_000], return_tensors="pt").input_ids[:, : args.prompt_tokens]
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True)
    print(f"prompt {ids.shape[1]} tokens, cache {args.sink_size}+{args.window_size}, {args.new_tokens} new tokens")
    reference = None
    for name, fast in (("band", False), ("fast", True)):
        cache = SinkCache(model, args.sink_size, args.window_size, fast_chunks=fast)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, **kw)
        logits = torch.cat(out.logits).float()
        if reference is None:  # the exact stream: the band run's tokens fed one by one
            stream = out.sequences[:, :-1]
            slow = prefill(model, SinkCache(model, args.sink_size, args.window_size), stream, chunk_size=1,
                           return_all_logits=True)[0, ids.shape[1] - 1 :].float()
            reference = (out.sequences[0, ids.shape[1] :], slow)
        tokens, slow = reference
        nll = lambda lg: torch.nn.functional.cross_entropy(lg, tokens, reduction="none")
        same = int((out.sequences[0, ids.shape[1] :] == tokens).cumprod(0).sum())
        print(f"{name}: max |logit diff| {(logits - slow).abs().max().item():.2e}, "
              f"max |NLL diff| {(nll(logits) - nll(slow)).abs().max().item():.2e} nats, "
              f"greedy tokens equal to exact streaming: first {same} of {len(tokens)}")


if __name__ == "__main__":
    main()
