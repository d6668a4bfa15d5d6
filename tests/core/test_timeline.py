"""Timeline.plan without tensors: which layout each forward gets, what is kept and evicted."""

from __future__ import annotations

import pytest

from streamingllm.timeline import ApproximateChunkError, ConcatStep, RingStep, Timeline, ViewStep


def rope(S=2, W=4, **kw):
    return Timeline(sink_size=S, window_size=W, capacity=S + W + 1, rotates=True, follows_positions=True,
                    rebase_every=1000, ring_capable=True, fast_chunks=True, **kw)


def alibi(S=2, W=4, slack=3):
    return Timeline(sink_size=S, window_size=W, capacity=S + W + 1 + slack, rotates=False, follows_positions=False,
                    rebase_every=1000, fast_chunks=True)


def run(t, qs, positions=None):
    """Plan forwards of the given sizes (positions: the caller's first position of each, or None)."""
    positions = positions or [None] * len(qs)
    return [t.plan(q, p) for q, p in zip(qs, positions)]


# (timeline, chunk sizes) -> per step: (kind, n before, new sinks, kept window), and the final counts
CASES = [
    # decoding token by token into S=2, W=4 (RoPE): views until full, then the ring for ever
    (rope, [1] * 9, [("view", 0, 1, 0), ("view", 1, 1, 0), ("view", 2, 0, 1), ("view", 3, 0, 2), ("view", 4, 0, 3),
                     ("view", 5, 0, 4), ("ring", 6, 0, 4), ("ring", 6, 0, 4), ("ring", 6, 0, 4)], (2, 4, 9)),
    # one chunk larger than the buffer: a fresh tensor, the window's tail kept
    (rope, [10], [("concat", 0, 2, 4)], (2, 4, 10)),
    # a chunk after ring decoding leaves the ring (the window is unrolled first)
    (rope, [6, 1, 1, 3], [("view", 0, 2, 4), ("ring", 6, 0, 4), ("ring", 6, 0, 4), ("concat", 6, 0, 4)], (2, 4, 11)),
    # ALiBi never rings: the view slides through the slack, then the window is compacted
    (alibi, [1] * 10, [("view", 0, 1, 0), ("view", 1, 1, 0)] + [("view", n, 0, min(n - 1, 4)) for n in range(2, 7)]
     + [("view", 6, 0, 4)] * 3, (2, 4, 10)),
]
KIND = {ViewStep: "view", ConcatStep: "concat", RingStep: "ring"}


@pytest.mark.parametrize("make, qs, expected, final", CASES)
def test_plan_table(make, qs, expected, final):
    t = make()
    steps = run(t, qs)
    assert [(KIND[type(s)], s.n, s.new_sinks, s.kept) for s in steps] == expected
    assert (t.n_sink, t.window, t.seen) == final


def test_ring_slots_cycle_through_every_window_slot():
    t = rope(S=2, W=4)
    run(t, [6])
    slots = [s.slot for s in run(t, [1] * 10)]
    assert sorted(set(slots)) == list(range(2, 7))  # the W + 1 slots after the sinks, none of 0..1
    assert all(a != b for a, b in zip(slots, slots[1:]))  # a token's slot is never the one just written


def test_alibi_view_moves_then_compacts():
    t = alibi(S=2, W=4, slack=3)
    steps = run(t, [6] + [1] * 6)
    offs = [s.off for s in steps[1:]]
    assert offs == [0, 1, 2, 3, 0, 1]  # evicting moves the view; at the buffer's end it goes back to 0
    assert [s.compact for s in steps[1:]] == [False, False, False, False, True, False]
    assert all(s.write_sinks for s in steps[2:])  # the sinks are rewritten in front of the moved window


def test_rebase_is_offered_and_followed():
    t = rope(S=2, W=4)
    t.rebase_every = 5
    run(t, [6])
    seen = []  # (position given, frame position the next token would have had, shift of the step)
    for _ in range(12):
        p, expected = t.next_position(), t.frame_next
        seen.append((p, expected, t.plan(1, p).shift))
    rebases = [(p, e, shift) for p, e, shift in seen if p != e]
    assert rebases and all(p == 6 and shift == p - e < 0 for p, e, shift in rebases)  # back to the in-cache position
    assert all(shift == 0 for p, e, shift in seen if p == e)  # otherwise the stored window stays as it is
    assert max(p for p, _, _ in seen) < 6 + 5  # the positions the model sees stay bounded


def test_exact_chunk_groups_count_overflowing_queries():
    t = rope(S=2, W=4)
    run(t, [6])  # full
    t.exact_next = 3
    step = t.plan(3, None)
    assert isinstance(step, ConcatStep) and step.groups == 3  # each query's own window overflowed by 1, 2, 3
    assert step.sink_deltas == (step.sink_delta, step.sink_delta + 1, step.sink_delta + 2)
    t.exact_next = 1
    assert t.plan(1, None).__class__ is RingStep  # one token never needs the banded layout


def test_sinks_are_positions_not_rotations_for_alibi():
    t = alibi()
    steps = run(t, [3, 5, 1])
    assert all(s.shift == 0 and s.sink_delta == 0 and s.new_sink_delta == 0 for s in steps)
    assert t.next_position() == t.seen == 9 and t.length == 6


def test_overflowing_chunks_are_refused_unless_exact_or_allowed():
    t = Timeline(sink_size=2, window_size=4, capacity=7, rotates=True, follows_positions=True, rebase_every=1000,
                 ring_capable=True)
    run(t, [7])  # S + W + 1 tokens at once: every token sees at most the sinks and the window
    before = (t.seen, t.window, t.n_sink)
    with pytest.raises(ApproximateChunkError, match="fast_chunks=True"):
        t.plan(2, None)  # the second token would see one window token too many
    assert (t.seen, t.window, t.n_sink) == before  # refused before anything moved
    t.fast_next = 2
    assert isinstance(t.plan(2, None), ConcatStep) and not t.fast_next  # allowed once
    t.exact_next = 4  # marked for a forward of 4 tokens, which never ran:
    with pytest.raises(ApproximateChunkError):
        t.plan(3, None)  # means nothing for one of 3
    t.exact_next = 3
    assert t.plan(3, None).groups == 3
    assert isinstance(t.plan(1, None), RingStep)  # one token never overflows
