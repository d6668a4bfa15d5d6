"""The interleaved scheduler (streamingllm.bench.schedule): call order, indices, counts, checks."""

from __future__ import annotations

import pytest

from streamingllm import bench


def test_arms_alternate_in_blocks_and_the_order_rotates_every_round():
    calls = []
    arms = {m: (lambda i, m=m: calls.append((m, i))) for m in ("a", "b", "c")}
    times = bench.interleave(arms, 4, block=2)
    # 2 rounds of 2 calls each: a b c, then b c a; every arm's call i has the same index
    assert calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1),
                     ("b", 2), ("b", 3), ("c", 2), ("c", 3), ("a", 2), ("a", 3)]
    assert list(times) == ["a", "b", "c"] and all(len(t) == 4 and min(t) >= 0 for t in times.values())


def test_warmup_is_untimed_and_an_arm_with_fewer_calls_runs_in_every_round():
    calls, synced, given_back, steps = [], [], [], []
    arms = {"fast": lambda i: calls.append(("fast", i)), "slow": lambda i: calls.append(("slow", i))}
    times = bench.interleave(arms, {"fast": 6, "slow": 3}, block=2, warmup=1, sync=lambda: synced.append(1),
                             after={"slow": lambda: given_back.append(1)}, on_step=steps.append)
    assert calls[:2] == [("fast", 0), ("slow", 0)]  # warm-up, arm after arm
    assert calls[2:] == [("fast", 1), ("fast", 2), ("slow", 1), ("slow", 2), ("fast", 3), ("fast", 4),
                         ("fast", 5), ("fast", 6), ("slow", 3)]
    assert [len(times["fast"]), len(times["slow"])] == [6, 3]
    assert len(synced) == 2 * 9  # before and after each timed call only
    assert len(given_back) == 4 and steps.count("slow") == 4 and steps.count("fast") == 7


def test_rounds_can_be_given():
    calls = []
    bench.interleave({"a": lambda i: calls.append("a"), "b": lambda i: calls.append("b")}, 4, block=4, rounds=4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_timed_measures_the_call():
    import time

    assert bench.timed(time.sleep, 0.02) >= 0.02


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(arms={}), TypeError, "arms must be a non-empty mapping"),
    (dict(counts=0), ValueError, "counts must be an integer >= 1, got 0"),
    (dict(counts={"a": 2}), ValueError, r"counts must give a count for each arm \(a, b\)"),
    (dict(block=0), ValueError, "block must be an integer >= 1, got 0"),
    (dict(warmup=-1), ValueError, "warmup must be an integer >= 0, got -1"),
    (dict(rounds=0), ValueError, "rounds must be an integer >= 1, got 0"),
])
def test_bad_arguments_name_the_parameter(kwargs, error, message):
    args = {"arms": {"a": print, "b": print}, "counts": 2, **kwargs}
    with pytest.raises(error, match=message):
        bench.interleave(args.pop("arms"), args.pop("counts"), **args)
