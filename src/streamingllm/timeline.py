"""The timeline: which tokens the cache keeps and where they sit, as counts and positions only.

All layers of a :class:`~streamingllm.cache.SinkCache` share one :class:`Timeline`. For every
forward pass of ``q`` new tokens, :meth:`Timeline.plan` decides the layout and returns a step
that each layer carries out on its tensors. Planning touches no tensor, so it is tested alone.

The layouts (buffer = one layer's preallocated key/value storage, ``S`` sinks, ``W`` window):

* :class:`ViewStep` -- attend to ``buffer[off : off + n + q]``, laid out ``[sinks | window | new]``.
  Evicting the oldest window token moves ``off`` by one; once the view reaches the buffer's end
  the window is *compacted* back to the front. The sinks are (re)written just before the window.
* :class:`ConcatStep` -- attend to a fresh tensor ``[sinks | window | new]`` when the step does
  not fit the buffer (a long chunk); with ``groups > 1`` it is the *exact* banded chunk: one
  copy of the sinks per in-cache position a query of the chunk needs them at.
* :class:`RingStep` -- RoPE, one token into a full cache: sinks at ``buffer[0:S]``, the window
  anywhere in the ``W + 1`` slots after them, the new token in the free slot (the evicted
  token's). A lone query's attention does not depend on key order, so nothing is moved.

Eviction is the window count going from ``window + q - new_sinks`` down to at most ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass


class ApproximateChunkError(ValueError):
    """A forward of several tokens that the model's causal mask would let see more than the sinks
    and the window, and that came with no exact banded mask.

    Args:
        q: tokens in the refused forward.
        held: tokens the cache held before it.
        size: ``sink_size + window_size`` (tokens).
    """

    def __init__(self, q: int, held: int, size: int):
        super().__init__(
            f"SinkCache: this forward feeds {q} tokens into a cache holding {held} of at most {size}, so under the "
            f"model's causal mask its last tokens would see up to {held + q - 1 - size} tokens more than "
            "sink_size + window_size, at shifted positions: not what streaming them one by one gives. "
            "Use streamingllm.generate(model, input_ids, cache, ...) or streamingllm.prefill(...) (exact chunked "
            "prefill), pass cache.exact_chunk_mask(q) as attention_mask, or opt in to the approximation with "
            "SinkCache(..., fast_chunks=True)."
        )


@dataclass(frozen=True)
class Step:
    """What every layer does with the ``q`` new tokens of one forward pass.

    Attributes:
        q: new tokens in this forward.
        n: tokens held before the step (sinks + window): in-cache index of the first new token.
        n_sink: sinks held before the step.
        new_sinks: how many of the new tokens become sinks (the stream's first ``S``).
        kept: window tokens held after the step.
        shift: RoPE: rotate the stored window by this many positions first (the caller moved
            its position frame: a rebase).
        sink_delta: RoPE: rotation from the sinks' stored positions to this step's.
        new_sink_delta: RoPE: rotation of new sink keys into the sinks' stored frame.
        unroll_head: RoPE: the window is stored as a ring whose oldest token is at this slot;
            put it in order at ``buffer[S:]`` first.
    """

    q: int
    n: int
    n_sink: int
    new_sinks: int
    kept: int
    shift: int = 0
    sink_delta: int = 0
    new_sink_delta: int = 0
    unroll_head: int | None = None


@dataclass(frozen=True)
class ViewStep(Step):
    """Attend to ``buffer[off : off + n + q]`` in cache order.

    Attributes:
        prev_off: where the view started before the step (the stored window is at
            ``prev_off + n_sink``).
        off: where this step's view starts.
        compact: move the window back to ``buffer[S:]`` first (then ``off == 0``).
        write_sinks: (re)write the sinks at ``buffer[off : off + S]``.
    """

    prev_off: int = 0
    off: int = 0
    compact: bool = False
    write_sinks: bool = False


@dataclass(frozen=True)
class ConcatStep(Step):
    """Attend to a fresh ``[sinks x groups | window | new]`` tensor; the kept window is copied
    back to ``buffer[S:]``.

    Attributes:
        prev_off: where the stored window's view starts (the window is at ``prev_off + n_sink``).
        groups: in-cache positions the sinks are seen from in an exact chunk: group ``g`` is
            rotated ``g`` positions further, for the queries whose own window has overflowed by
            ``g`` tokens. One copy of the sinks per group, unless ``sink_scores``.
        sink_scores: exact chunk with one zero-key copy of the sinks; each query's sink logits are
            computed by the sink-aware attention (:class:`~streamingllm.attention.SinkScores`).
    """

    prev_off: int = 0
    groups: int = 1
    sink_scores: bool = False

    @property
    def sink_deltas(self) -> tuple[int, ...]:
        return tuple(self.sink_delta + g for g in range(self.groups))

    @property
    def query_sink_deltas(self) -> tuple[int, ...]:
        """Per new token: the rotation that moves its query from the model's position to the one it
        sees the stored sinks from, i.e. minus its group's sink rotation (the first ``q - groups + 1``
        tokens are in group 0, each later one a group further)."""
        first = self.q - self.groups  # tokens before the first overflowing one
        return tuple(-(self.sink_delta + max(0, i - first)) for i in range(self.q))


@dataclass(frozen=True)
class RingStep(Step):
    """RoPE, one token into a full cache: the whole ``S + W + 1``-slot buffer is attended to.

    Attributes:
        slot: buffer slot the new token is written to (the evicted token's).
        write_sinks: (re)write the rotated sink keys at ``buffer[0:S]``.
        write_sink_values: write the sink values at ``buffer[0:S]`` (on entering the ring).
    """

    slot: int = 0
    write_sinks: bool = False
    write_sink_values: bool = False


@dataclass
class Timeline:
    """Counts and positions shared by all layers; no tensors.

    Attributes:
        sink_size: attention-sink tokens kept (S).
        window_size: most recent tokens kept (W).
        capacity: slots per layer buffer.
        rotates: True for RoPE models (keys carry their position), False for ALiBi.
        follows_positions: True when the cache sees the caller's position ids, and so may
            suggest rebased positions (:meth:`next_position`).
        rebase_every: frame/in-cache drift (tokens) after which :meth:`next_position` rebases.
        ring_capable: single-token steps into a full cache may use :class:`RingStep` (needs
            ``capacity == S + W + 1`` and RoPE).
        masks_itself: the model's own sliding-window mask gives every query of a chunk exactly its
            own last ``W + 1`` tokens (a hybrid model's sliding layers, kept as ``S = 0``,
            ``W = sliding_window - 1``): chunks that overflow the window need no band.
    """

    sink_size: int
    window_size: int
    capacity: int
    rotates: bool
    follows_positions: bool
    rebase_every: int
    ring_capable: bool = False
    masks_itself: bool = False
    seen: int = 0  # tokens of the stream processed so far (exact Python int, never wraps)
    n_sink: int = 0  # sinks held
    window: int = 0  # window tokens held
    off: int = 0  # buffer index where the cache's view starts
    frame_next: int = 0  # model-frame position of the next token
    sink_frame: int = 0  # model-frame position the stored sink 0 is rotated at
    sinks_in_buffer: tuple[int, int] | None = (0, 0)  # (off, sink_delta) of the sinks written in the buffer
    exact_next: int = 0  # the next forward, if of this many tokens, comes with an exact banded mask
    fast_next: int = 0  # the next forward, if of this many tokens, may use the plain causal mask
    fast_chunks: bool = False  # every chunk may (the cache's ``fast_chunks`` option)
    ring: bool = False  # the window is a ring in buffer[S : S + W + 1], oldest token at `head`
    head: int = 0

    @property
    def length(self) -> int:
        """Tokens currently held (sinks + window)."""
        return self.n_sink + self.window

    STATE = ("seen", "n_sink", "window", "off", "frame_next", "sink_frame", "sinks_in_buffer", "exact_next",
             "fast_next", "ring", "head")  # what a stream changes (the rest are settings)

    def reset(self) -> None:
        """Forget the stream (sizes and settings are kept)."""
        self.seen = self.n_sink = self.window = self.off = self.frame_next = self.sink_frame = self.head = 0
        self.sinks_in_buffer, self.exact_next, self.fast_next, self.ring = (0, 0), 0, 0, False

    def snapshot(self) -> dict:
        """The stream's state (the :attr:`STATE` fields), to :meth:`restore` later or save."""
        return {name: getattr(self, name) for name in self.STATE}

    def restore(self, state: dict, frame_shift: int = 0) -> None:
        """Go back to a :meth:`snapshot` (or a saved state), with the position frame moved by
        ``frame_shift`` tokens (a rebase that was kept). The sinks are rewritten at the next step,
        since the buffer's may not be those the snapshot describes."""
        for name in self.STATE:
            setattr(self, name, state[name])
        self.frame_next += frame_shift
        self.sinks_in_buffer = None

    def compacted(self) -> dict:
        """The :meth:`snapshot` of this stream with its view moved to the buffer's start (a ring
        already starts there): how a saved state stores it, without the buffer's empty slots."""
        return {**self.snapshot(), "off": 0}

    def expect_exact(self, q: int) -> None:
        """The next forward, if of ``q`` tokens, comes with its exact banded mask."""
        self.exact_next = q

    def allow_fast(self, q: int) -> None:
        """The next forward, if of ``q`` tokens, may overflow the window under the plain causal mask."""
        self.fast_next = q

    def needs_band(self, q: int) -> bool:
        """A forward of ``q`` tokens overflows the window and nothing said how to mask it: only its
        exact band (built by the cache) makes it what streaming the tokens one by one gives."""
        return self.overflows(q) and not (self.exact_next == q or self.fast_next == q or self.fast_chunks)

    def overflows(self, q: int) -> bool:
        """True when some of ``q`` new tokens would see more than the sinks and the window under a
        causal mask: then only the exact layout (one sink copy per overflowing token) is exact."""
        return q > 1 and self.length + q > self.sink_size + self.window_size + 1

    def next_position(self) -> int:
        """The position the library's own loops give the next token (see ``SinkCache.position_ids``).

        It is the stream's own frame (``frame_next``), moved back to the in-cache position once that
        frame has run ``rebase_every`` tokens ahead, so that the positions the model computes angles
        for stay small however long the stream. Only families whose positions reach the cache
        (``follows_positions``) are rebased; the others keep the stream's frame.
        """
        if self.seen == 0:
            return 0
        if self.rotates and self.follows_positions and self.frame_next - self.length >= self.rebase_every:
            return self.length
        return self.frame_next

    def plan(self, q: int, p0: int | None, sink_scores: bool = False) -> Step:
        """Plan one forward pass of ``q`` new tokens whose first position is ``p0``, and advance.

        ``p0`` is the position the caller gave the first new token; None when the model does not
        pass position ids to the cache: it then computed them from ``get_seq_length()``, which is
        :attr:`seen` (transformers' contract: the number of tokens consumed). ``sink_scores``: an
        exact banded chunk gives the sinks as one zero-key copy whose logits the attention computes
        (:attr:`ConcatStep.sink_scores`), not one rotated copy per group.
        """
        S, W = self.sink_size, self.window_size
        if self.exact_next != q:  # a mark for another forward (one that never ran) means nothing here
            self.exact_next = 0
        if self.overflows(q) and not (self.exact_next or self.fast_next == q or self.fast_chunks or self.masks_itself):
            raise ApproximateChunkError(q, self.length, S + W)
        if p0 is None or not self.rotates:
            p0 = self.seen
        if self.seen == 0:
            self.frame_next = self.sink_frame = p0
        n, new_sinks = self.length, min(q, S - self.n_sink)
        rope = {}
        if self.rotates:
            rope = dict(shift=(p0 - self.frame_next) if self.window else 0, sink_delta=p0 - n - self.sink_frame,
                        new_sink_delta=self.sink_frame + self.n_sink - p0)
        ring_step = self.ring_capable and q == 1 and self.n_sink == S and self.window == W
        if self.ring and not ring_step:  # leaving the ring: the window is first put in order at S
            rope["unroll_head"], self.ring, self.off = self.head, False, 0
        if ring_step:
            step = self._ring_step(n, rope)
        else:
            kept = min(self.window + q - new_sinks, W)
            evicted = self.window + q - new_sinks - kept
            common = dict(q=q, n=n, n_sink=self.n_sink, new_sinks=new_sinks, kept=kept, prev_off=self.off, **rope)
            if self.exact_next and self.overflows(q) and not self.masks_itself:
                step = ConcatStep(groups=self.length + q - S - W, sink_scores=sink_scores, **common)
            elif self.off + n + q > self.capacity and n + q > self.capacity:
                step = ConcatStep(**common)
            else:
                off = 0 if self.off + n + q > self.capacity else self.off
                delta = rope.get("sink_delta", 0)
                write = bool(self.n_sink) and self.sinks_in_buffer != (off, delta)
                step = ViewStep(off=off, compact=off != self.off, write_sinks=write, **common)
            if isinstance(step, ViewStep):
                moved = step.new_sinks and step.new_sink_delta  # new sinks are stored rotated: rewrite next time
                self.sinks_in_buffer = None if moved else (step.off, step.sink_delta)
                self.off = step.off + evicted
            else:  # the kept window is copied to buffer[S:]; the sinks are rewritten next step
                self.off, self.sinks_in_buffer = 0, None
            self.n_sink += new_sinks
            self.window = kept
        self.exact_next = self.fast_next = 0
        self.seen += q
        self.frame_next = p0 + q
        return step

    def _ring_step(self, n: int, rope: dict) -> RingStep:
        """One token into a full cache, ring layout (see :class:`RingStep`): the new token takes
        the free slot, and the oldest window token's slot becomes the next free one."""
        S, W = self.sink_size, self.window_size
        head = self.head if self.ring else self.off + S  # an ordered window starts at off + S (off <= 1)
        step = RingStep(q=1, n=n, n_sink=S, new_sinks=0, kept=W, slot=head - 1 if head > S else S + W,
                        write_sinks=bool(S) and self.sinks_in_buffer != (0, rope["sink_delta"]),
                        write_sink_values=bool(S) and not self.ring, **rope)
        self.ring, self.head, self.off = True, S + (head - S + 1) % (W + 1), 0
        self.sinks_in_buffer = (0, step.sink_delta)
        return step
