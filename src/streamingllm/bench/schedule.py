"""The interleaved scheduler every benchmark times its arms with.

Arms alternate in blocks of calls in one process, the arm order rotating every round, so machine
noise (other jobs, frequency changes, a warming cache) hits every arm alike. Call ``i`` of every
arm gets the same index, so arms that look their inputs up by it see the same token ids.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from ..checks import ArgumentError, ArgumentTypeError, check_int


def timed(fn: Callable, *args, sync: Callable[[], None] | None = None) -> float:
    """Wall-clock seconds of ``fn(*args)``; ``sync`` (e.g. ``torch.cuda.synchronize``) is called
    before and after, so the time covers the device's work."""
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    fn(*args)
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def interleave(
    arms: Mapping[str, Callable[[int], object]], counts: int | Mapping[str, int], block: int = 8, *,
    rounds: int | None = None, warmup: int = 0, sync: Callable[[], None] | None = None,
    after: Mapping[str, Callable[[], object]] | None = None, on_step: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Time ``counts[m]`` calls ``arms[m](i)`` of every arm, interleaved; returns each arm's seconds.

    Args:
        arms: ``{name: step}``; ``step(i)`` runs the arm's call number ``i`` (0, 1, ... per arm,
            warm-up calls first), so every arm can take the same inputs at the same ``i``.
        counts: timed calls per arm (>= 1), one number for all arms or ``{name: count}``.
        block: about this many calls an arm makes before the next takes over (>= 1).
        rounds: rounds of blocks (default ``ceil(max(counts) / block)``); each arm spreads its
            count evenly over them, so an arm with fewer calls still runs in every round.
        warmup: untimed calls of each arm, arm after arm, before the timed rounds.
        sync: called before and after each timed call (the device, for wall-clock time).
        after: ``{name: fn}``, run untimed after each of that arm's calls (e.g. give back a slot).
        on_step: called with the arm's name after each call, warm-up included (progress).

    Returns:
        ``{name: [seconds of each timed call, in order]}``, the arms in ``arms``' order.
    """
    if not isinstance(arms, Mapping) or not arms:
        raise ArgumentTypeError("arms", "must be a non-empty mapping of names to callables", arms)
    order = list(arms)
    counts = {m: counts for m in order} if not isinstance(counts, Mapping) else dict(counts)
    if set(counts) != set(order):
        raise ArgumentError("counts", f"must give a count for each arm ({', '.join(map(str, order))})", counts)
    counts = {m: check_int("counts", counts[m], 1) for m in order}
    block, warmup = check_int("block", block, 1), check_int("warmup", warmup, 0)
    rounds = math.ceil(max(counts.values()) / block) if rounds is None else check_int("rounds", rounds, 1)
    after = after or {}
    for m in order:
        for i in range(warmup):
            arms[m](i)
            _done(m, after, on_step)
    times: dict[str, list[float]] = {m: [] for m in order}
    for r in range(rounds):
        for m in order[r % len(order):] + order[: r % len(order)]:
            tt = times[m]
            for _ in range((r + 1) * counts[m] // rounds - r * counts[m] // rounds):
                tt.append(timed(arms[m], warmup + len(tt), sync=sync))
                _done(m, after, on_step)
    return times


def _done(m: str, after: Mapping[str, Callable[[], object]], on_step) -> None:
    """The untimed work after one call of arm ``m``."""
    if m in after:
        after[m]()
    if on_step is not None:
        on_step(m)
