"""Run under ``torchrun --nproc-per-node 2``: a saved model split by transformers' tensor
parallelism (``tp_plan="auto"``, gloo on CPU), streamed through a SinkCache on every rank.
Rank 0 saves the logits of an exact chunked prefill then of single-token decoding.

Usage: torchrun --nproc-per-node 2 tp_worker.py MODEL_DIR OUT_FILE
"""

import sys

import torch
import torch.distributed as dist
import transformers as tf

from streamingllm import SinkCache
from streamingllm.feed import prefill

model_dir, out = sys.argv[1], sys.argv[2]
model = tf.AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
ids = torch.randint(0, model.config.vocab_size, (1, 160), generator=torch.Generator().manual_seed(1))
cache = SinkCache(model, 4, 28, rebase_every=40)
chunked = prefill(model, cache, ids[:, :100], chunk_size=16, return_all_logits=True)
one_by_one = prefill(model, cache, ids[:, 100:], chunk_size=1, return_all_logits=True)
heads = cache.layers[0].keys.shape[1]
if dist.get_rank() == 0:
    torch.save({"logits": torch.cat([chunked, one_by_one], 1), "ids": ids, "heads": heads}, out)
dist.destroy_process_group()
