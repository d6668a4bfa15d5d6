"""Which whole turns of a conversation a cache's window holds: turn-aligned eviction's bookkeeping.

A :class:`~streamingllm.session.Session` with ``evict="turns"`` never lets the window lose part of a
message: before a turn is fed, the oldest whole exchanges (a user message, the reply, their role
headers) leave the window until the turn and its longest reply fit. With a
:class:`~streamingllm.cache.MemoryCache` they go to its memory whole (:meth:`MemoryCache.evict`),
counted here exactly as they were fed; with a :class:`~streamingllm.cache.SinkCache` the session
feeds the kept exchanges again instead (its window cannot drop tokens early), which the session
plans by rendering the template.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HeldTurns:
    """The exchanges whose tokens the window holds, oldest first: ``[messages, tokens]`` each.

    ``tokens`` counts the exchange's tokens in the window (not those that went to the sinks)."""

    units: list[list[int]] = field(default_factory=list)
    _opened_at: int = 0

    def clear(self) -> None:
        self.units.clear()

    def opened(self, seen: int) -> None:
        """A turn starts after ``seen`` tokens of the stream."""
        self._opened_at = seen

    def closed(self, messages: int, seen: int, window: int) -> None:
        """The turn (``messages`` messages, the reply included) ended at ``seen`` tokens; the window
        holds ``window`` tokens: what is not in it (sinks, token eviction) is taken from the oldest."""
        self.units.append([messages, seen - self._opened_at])
        excess = sum(t for _, t in self.units) - window
        while excess > 0 and self.units:
            cut = min(excess, self.units[0][1])
            self.units[0][1] -= cut
            excess -= cut
            if not self.units[0][1]:
                self.units.pop(0)

    def plan(self, need: int, free: int) -> tuple[int, int, int]:
        """The oldest exchanges to evict so that ``need`` tokens fit in ``free`` plus what they free:
        ``(exchanges, messages, tokens)``; all of them when even that is not enough."""
        exchanges = messages = tokens = 0
        while need > free + tokens and exchanges < len(self.units):
            messages += self.units[exchanges][0]
            tokens += self.units[exchanges][1]
            exchanges += 1
        return exchanges, messages, tokens

    def evicted(self, exchanges: int) -> None:
        del self.units[:exchanges]
