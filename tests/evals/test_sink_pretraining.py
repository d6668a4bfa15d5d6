"""The Table-3 evaluation's plan and arithmetic (the end-to-end run is in tests/train/test_pretrain.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamingllm.checks import ArgumentError
from streamingllm.evals.attention import SinkStats
from streamingllm.evals.sink_pretraining import (EvalPlan, SinkPretrainReport, VariantScores, deep_mean, dense_inside,
                                                 dense_past, markdown_table, past, position_edges,
                                                 shares_by_position, uniform_share)


def test_the_plan_takes_the_papers_proportions():
    plan = EvalPlan.for_trained_length(256)
    assert (plan.cache_size, plan.dense_tokens, plan.stats_tokens, plan.sink_sizes) == (128, 1024, 256, (0, 1, 2, 4))
    assert [plan.label(s) for s in plan.sink_sizes] == ["0+128", "1+127", "2+126", "4+124"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache_size=4), "cache_size must be an integer >= 5, got 4"),
    (dict(sink_sizes=[1, 1]), "sink_sizes must not repeat a value"),
    (dict(sink_sizes=[-1]), "sink_sizes must be an integer >= 0, got -1"),
    (dict(eval_tokens=1), "eval_tokens must be an integer >= 2, got 1"),
    (dict(eval_tokens=500), "dense_tokens must be an integer >= 2 and <= 500, got 1024"),
])
def test_a_bad_plan_names_the_parameter(kwargs, message):
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EvalPlan.for_trained_length(256, **kwargs)


def _scores(variant, streaming, dense):
    stats = SinkStats(variant, 4, np.zeros(4), np.array([0.9, 0.9, 0.2, 0.4]), 0.02, 256, np.array([0, 0, 0.1, 0.3]))
    return VariantScores(variant, streaming, dense, stats, by_position={(1, 8): (0.3, 0.1), (8, 16): (0.1, 0.0)})


def test_dense_past_the_trained_length_weighs_segments_by_length():
    plan = EvalPlan.for_trained_length(100, dense_tokens=250)
    r = _scores("vanilla", {}, {(0, 100): 20.0, (100, 200): 50.0, (200, 250): 200.0})
    r.streaming_segments = {(0, 100): 20.0, (100, 200): 30.0, (200, 250): 30.0}
    assert dense_inside(r) == 20.0
    assert dense_past(r, plan) == pytest.approx(math.exp((100 * math.log(50) + 50 * math.log(200)) / 150))
    assert past(r.streaming_segments, plan) == pytest.approx(30.0)
    assert deep_mean(r.stats.first_share) == pytest.approx(0.3)  # layers after the first two
    assert deep_mean(r.stats.softmax_sink_share) == pytest.approx(0.2)


def test_the_markdown_table_sits_beside_the_papers():
    plan = EvalPlan.for_trained_length(16, sink_sizes=[0, 1, 4])
    report = SinkPretrainReport(plan, [_scores(v, {0: 9.0, 1: 8.0, 4: 7.5}, {(0, 16): 1.0})
                                       for v in ("vanilla", "sink-token", "softmax1", "sink-logit")])
    md = markdown_table(report).splitlines()
    assert md[0] == "| variant | 0+8 | 1+7 | 4+4 | paper, 160M: 0+1024 / 1+1023 / 4+1020 |"
    assert md[2] == "| vanilla | 9.00 | 8.00 | 7.50 | 27.87 / 18.49 / 18.05 |"
    assert md[3].endswith("| 1235 / 18.01 / 18.02 |") and md[4].endswith("| 29214 / 19.9 / 18.01 |")
    assert md[5].endswith("| (not in the paper) |")
    table = report.table()
    assert "first token q1-7 / q8-15" in table and "0.300 / 0.100" in table and "0.100 / 0.000" in table


def test_shares_by_position_on_a_hand_built_map():
    """Layers 0-1 are ignored; in layer 2 every query puts 0.5 on token 0 and leaves 0.1 to a softmax sink."""
    T = 8
    a = torch.zeros(1, T, T)
    a[0, 0, 0] = 0.9
    for q in range(1, T):
        a[0, q, 0] = 0.5
        a[0, q, 1:q + 1] = 0.4 / q
    edges = position_edges(T)
    assert edges == [1, 4, 8]
    shares = shares_by_position([torch.eye(T)[None], torch.eye(T)[None], a], edges)
    assert set(shares) == {(1, 4), (4, 8)}
    assert uniform_share(1, 4) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    for first, virtual in shares.values():
        assert first == pytest.approx(0.5) and virtual == pytest.approx(0.1, abs=1e-6)
