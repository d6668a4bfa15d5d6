"""The cache under transformers' tensor parallelism: 2 CPU processes (gloo) under torchrun, each
holding half the key/value heads, give the logits of one process with the whole model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference import ReferenceSinkCache
from tiny import tiny_model

TOL = 1e-4


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="needs torchrun")
def test_tensor_parallel_ranks_stream_exactly(tmp_path):
    model = tiny_model("llama", num_key_value_heads=2)
    model.save_pretrained(tmp_path / "model")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    worker = Path(__file__).with_name("tp_worker.py")
    subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(worker),
                    str(tmp_path / "model"), str(tmp_path / "out.pt")], check=True, env=env, timeout=600,
                   capture_output=True)
    got = torch.load(tmp_path / "out.pt")
    assert got["heads"] == 1  # each rank cached its own half of the 2 key/value heads
    cache = ReferenceSinkCache(model, 4, 28)
    with torch.no_grad():
        ref = torch.cat([model(got["ids"][:, t : t + 1], cache=cache).logits for t in range(got["ids"].shape[1])], 1)
    assert (got["logits"] - ref).abs().max().item() <= TOL
