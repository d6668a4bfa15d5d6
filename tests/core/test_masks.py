"""The cache's masks as pure functions of counts, checked against their definitions (no model)."""

from __future__ import annotations

import pytest
import torch

from streamingllm.cache.masks import exact_band, rows_mask, sliding_band

CASES = [  # (S, W, n_sink, window, q): chunks overflowing a full cache, a filling one, one with sinks still to come
    (4, 8, 4, 8, 5),
    (4, 8, 4, 3, 20),
    (4, 8, 2, 0, 30),
    (1, 5, 1, 5, 12),
    (0, 6, 0, 6, 9),
]


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask[0, 0] == 0


@pytest.mark.parametrize("S, W, n_sink, window, q", CASES)
def test_the_exact_band_gives_each_query_the_sinks_and_its_own_window(S, W, n_sink, window, q):
    """Query i is held token ``at = n_sink + window + i``: it sees the sinks up to itself and every
    non-sink token of ``at - W .. at`` -- what feeding the chunk token by token gives it."""
    mask = exact_band(S, W, n_sink, window, q, sink_scores=True)
    held = [*range(n_sink), *range(n_sink, n_sink + window)]  # the held tokens by index, then the new ones
    keys = [*range(S), *held[n_sink:], *range(n_sink + window, n_sink + window + q)]
    assert mask.shape == (1, 1, q, len(keys)) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, torch.finfo(torch.float32).min}
    for i in range(q):
        at = n_sink + window + i
        want = [j < S and j <= at for j in range(S)]
        want += [S <= h and at - W <= h <= at for h in keys[S:]]
        assert _allowed(mask)[i].tolist() == want, i
        assert int(_allowed(mask)[i].sum()) == min(at + 1, S + W + 1)  # never more than the cache keeps


@pytest.mark.parametrize("S, W, n_sink, window, q", [c for c in CASES if c[0] and c[2] == c[0]])
def test_the_copies_layout_shows_each_query_its_own_copy_of_the_same_keys(S, W, n_sink, window, q):
    """One copy of the sinks per group of queries (how far the query's own window overflowed): each
    query sees only its group's copy, and the same keys as in the one-copy layout."""
    one = _allowed(exact_band(S, W, n_sink, window, q, sink_scores=True))
    copies = _allowed(exact_band(S, W, n_sink, window, q, sink_scores=False))
    groups = n_sink + window + q - S - W
    assert copies.shape[-1] == groups * S + one.shape[-1] - S
    for i in range(q):
        group = max(0, n_sink + window + i - S - W)
        seen = copies[i, : groups * S].reshape(groups, S)
        assert seen[group].tolist() == one[i, :S].tolist()
        assert not seen[torch.arange(groups) != group].any()
        assert copies[i, groups * S :].tolist() == one[i, S:].tolist()


def test_a_mask_built_on_the_wrong_rule_is_caught():
    """Negative control: a band one token too wide differs from the definition's count."""
    mask = exact_band(4, 8, 4, 8, 5, sink_scores=True)
    assert int(_allowed(mask)[-1].sum()) == 4 + 8 + 1
    wider = exact_band(4, 9, 4, 8, 5, sink_scores=True)
    assert int(_allowed(wider)[-1].sum()) != 4 + 8 + 1


@pytest.mark.parametrize("held, window, q", [(0, 4, 7), (3, 4, 2), (11, 12, 30)])
def test_the_sliding_band_sees_each_querys_own_last_window(held, window, q):
    allowed = _allowed(sliding_band(held, window, q))
    assert allowed.shape == (q, held + q)
    for i in range(q):
        at = held + i
        assert allowed[i].nonzero().flatten().tolist() == list(range(max(0, at - window + 1), at + 1))


def test_rows_mask_gives_each_row_its_own_mask_and_pads_the_first_key():
    """Row 0: 3 real tokens of 4 columns, causal over its 6 keys; row 1: 4 real tokens with its
    exact band; row 2: 2 real tokens over a sliding window of 3."""
    band = exact_band(2, 3, 2, 3, 4, sink_scores=False)
    lengths, new, q = [6, band.shape[-1], 5], [3, 4, 2], 4
    mask = rows_mask(lengths, new, q, bands=[None, band, None], windows=(None, None, 3))
    allowed = mask[:, 0] == 0
    assert mask.shape == (3, 1, q, max(lengths))
    assert allowed[0, 0].nonzero().flatten().tolist() == [0]  # a pad column sees the first key only
    assert allowed[0, 1:, :6].tolist() == [[j <= 3 + i for j in range(6)] for i in range(3)]
    assert not allowed[0, :, 6:].any()  # nothing past the row's own keys
    assert torch.equal(allowed[1, :, : band.shape[-1]], _allowed(band))
    assert allowed[2, 2:, :5].tolist() == [[3 + i - 3 < j <= 3 + i for j in range(5)] for i in range(2)]
