"""The llama.cpp arm on the default model's GGUF (llama-cpp-python is an optional extra: skipped without it)."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from streamingllm import bench  # noqa: E402
from streamingllm.bench.llamacpp import LlamaCppArm, gguf_of  # noqa: E402

pytestmark = pytest.mark.slow


def test_the_arm_holds_n_tokens_before_each_step():
    arm = LlamaCppArm(gguf_of("smollm2-135m"), 16, list(range(100, 116)), threads=1)
    assert arm.held == 16
    for token in (5, 6, 7):
        arm.step(token)
        assert arm.held == 17
        arm.rewind()
        assert arm.held == 16
    assert gguf_of("smollm2-135m").suffix == ".gguf"


def test_bench_decode_runs_llama_cpp_beside_the_torch_arms():
    import torch

    from streamingllm import load

    model, _ = load()
    torch.set_num_threads(1)
    rows = bench.bench_decode(model, sizes=[16], methods=["streaming", "llama.cpp"], steps=2, warmup=1,
                              progress=False, gguf=gguf_of("smollm2-135m"))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"streaming", "llama.cpp"} and by["llama.cpp"]["limit_ms"] is None
    assert by["streaming"]["vs_llamacpp"] == pytest.approx(by["streaming"]["median_ms"] / by["llama.cpp"]["median_ms"])
