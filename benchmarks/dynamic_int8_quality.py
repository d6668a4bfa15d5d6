"""Why ``--quantize`` offers no dynamic int8: its perplexity on the default model.

    . .venv/bin/activate && python benchmarks/dynamic_int8_quality.py --num-tokens 5000

torch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``, per-channel int8 weights,
activations quantized per call) is the fastest eager path on this CPU, but quantizing the
activations of a 135M model costs far more than the 2% of perplexity a low-precision path may
cost. Printed: streaming perplexity (4+1020, exact chunks) on Austen's text for float32 and for
dynamic int8 on every linear layer, and with the layers known for activation outliers left in
float32 (``down_proj``, the output head).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from torch import nn

from streamingllm import load
from streamingllm.evals.corpus import austen_text
from streamingllm.evals.perplexity import Setting, score_cached


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-tokens", type=int, default=5000, help="Austen tokens scored")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model, tokenizer = load()
    ids = torch.tensor(tokenizer(austen_text()[: a.num_tokens * 16], add_special_tokens=False).input_ids[: a.num_tokens])
    setting = Setting("streaming", 4, 1020)

    def ppl(m) -> float:
        return float(np.exp(score_cached(m, ids, setting).nll.mean()))

    base = ppl(model)
    print(f"{len(ids)} Austen tokens, streaming 4+1020")
    print(f"{'weights':>44} {'ppl':>7} {'vs float32':>11}")
    print(f"{'float32':>44} {base:>7.3f} {'':>11}")
    for keep in ((), ("lm_head",), ("down_proj",), ("down_proj", "lm_head")):
        m, _ = load()
        spec = {name: per_channel_dynamic_qconfig for name, mod in m.named_modules()
                if isinstance(mod, nn.Linear) and not name.endswith(keep or ("-",))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
            m = quantize_dynamic(m, spec, dtype=torch.qint8)
        label = "dynamic int8" + (f", {' and '.join(keep)} in float32" if keep else ", every linear")
        value = ppl(m)
        print(f"{label:>44} {value:>7.3f} {100 * (value / base - 1):>+10.1f}%", flush=True)


if __name__ == "__main__":
    main()
