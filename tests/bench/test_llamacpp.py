"""The llama.cpp arm on the default model's GGUF (llama-cpp-python is an optional extra: skipped without it)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from streamingllm import bench  # noqa: E402
from streamingllm.bench.llamacpp import LlamaCppArm, gguf_of  # noqa: E402

pytestmark = pytest.mark.slow


def _last_logits(arm: LlamaCppArm) -> np.ndarray:
    """The logits of the last token llama.cpp evaluated (a copy: the next step overwrites them)."""
    return np.array(arm.llm.scores[arm.llm.n_tokens - 1], dtype=np.float64)


def test_each_step_sees_exactly_the_n_held_tokens():
    """A step after rewinds computes what a fresh context holding the same N tokens computes for
    that token: the rewound tokens are gone from what llama.cpp attends to. (The held count cannot
    show that: it is what rewind sets.)"""
    path = gguf_of("smollm2-135m")
    assert path.suffix == ".gguf" and path.is_file()
    history = list(range(100, 116))
    arm = LlamaCppArm(path, 16, history, threads=1)
    assert arm.held == 16
    steps = {}
    for token in (5, 6, 7):
        arm.step(token)
        assert arm.held == 17
        steps[token] = _last_logits(arm)
        arm.rewind()
        assert arm.held == 16
    fresh = LlamaCppArm(path, 16, history, threads=1)
    fresh.step(7)
    assert np.abs(steps[7] - _last_logits(fresh)).max() <= 1e-4
    fresh.step(6)  # no rewind: 17 tokens held before this one, so its logits differ from the arm's
    assert np.abs(steps[6] - _last_logits(fresh)).max() > 1e-2


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
