"""The attention-sink KV cache: which tokens to keep, and at which positions.

StreamingLLM semantics (Xiao et al., 2024): after every step the cache holds the KV of the
first ``sink_size`` tokens of the stream (the attention sinks) and of the last
``window_size`` tokens. The next token attends to those and to itself, at positions
``0 .. sink_size + window_size`` *inside the cache*, whatever positions the caller used.

How it is exact and cheap (details in docs/design.md):

* Storage is one preallocated buffer per layer. RoPE families: ``S + W + 1`` slots; once the
  cache is full, single-token steps use a *ring*: sinks at ``buffer[0:S]``, the window in the
  other slots in any order, the new token in the free slot, and the whole (contiguous, fixed
  shape) buffer is attended to -- a lone query's attention does not depend on key order. The
  evicted token's slot is the next free one; nothing is moved. Chunks of several tokens first
  put the window back in order. ALiBi families (order matters): ``[sinks | window | room |
  slack]``, the attention reads a *view* ``buffer[off : off + n + q]`` in cache order;
  evicting moves ``off`` by one, the sinks (kept in a small side store) are written just in
  front of the window, and the window is moved back to the front once every ``slack`` tokens.
* RoPE: a query-key score depends only on the difference of their rotation angles. The
  window is contiguous in the stream, so the distance between the query and a window key
  never changes when positions are taken inside the cache; only the sinks' distance does.
  Window keys therefore keep the rotation the model gave them; only the sink keys are
  rotated, once per step, from their stored copy (never rotated twice, so nothing drifts).
  The rotation angles are computed in float64 from integer position differences.
* Positions given to the model stay small: ``get_seq_length()`` suggests a position that
  is rebased to the in-cache position every so often (then the window is rotated once), so
  stream position one million computes the same angles as position one thousand.
* ALiBi: the bias depends on the key's index in the view, which is already the in-cache
  position; nothing is rotated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, StaticLayer

from .checks import check_int
from .families import Family, UnsupportedModelError, alibi_limit, family_of, rope_inv_freq, sliding_window_of

# --------------------------------------------------------------------------------------
# Rotation by a position difference (RoPE, "rotate_half" layout, optionally partial)
# --------------------------------------------------------------------------------------


class Rotator:
    """Rotates cached keys by integer position differences.

    Args:
        inv_freq: the model's rotary inverse frequencies (radians per position), length
            ``rot_dim / 2``; the first ``rot_dim`` channels of each head are rotated.
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq64 = inv_freq.detach().to(torch.float64).cpu()
        self.half = self.inv_freq64.numel()
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, deltas: tuple[int, ...], device, dtype, repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of ``delta * inv_freq``, each delta repeated ``repeats`` times: (len * repeats, half).

        Angles are computed in float64 from the integer deltas, then cast; results are memoised,
        so all layers of one step share one computation.
        """
        key = (deltas, repeats, device, dtype)
        hit = self._memo.get(key)
        if hit is None:
            angles = torch.tensor(deltas, dtype=torch.float64)[:, None] * self.inv_freq64[None, :]
            angles = angles.repeat_interleave(repeats, dim=0)
            hit = (angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype))
            if len(self._memo) > 64:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None):
        """Rotate ``x`` (..., T, head_dim) by angles with cos/sin broadcastable to (..., T, half).

        Writes into ``out`` (which may be ``x`` itself) when given, else into a new tensor.
        Channels past ``2 * half`` (partial rotary) are copied unchanged.
        """
        h = self.half
        x1, x2 = x[..., :h], x[..., h : 2 * h]
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        if out is None:
            out = torch.empty_like(x)
        if out is not x and x.shape[-1] > 2 * h:
            out[..., 2 * h :].copy_(x[..., 2 * h :])
        out[..., :h].copy_(r1)
        out[..., h : 2 * h].copy_(r2)
        return out


# --------------------------------------------------------------------------------------
# The timeline: the one place that decides which tokens are kept and where they sit
# --------------------------------------------------------------------------------------


@dataclass
class Step:
    """What every layer does with the ``q`` new tokens of one forward pass."""

    q: int
    n: int  # tokens in the cache before this step (sinks + window): in-cache index of the first new token
    n_sink: int  # sinks stored before this step
    prev_off: int  # buffer index where the cache's view started before this step
    off: int  # buffer index where this step's view starts ("view" mode)
    mode: str = "view"  # "view": attend to a view of the buffer; "concat"/"exact": to a fresh tensor
    shift: int = 0  # rotate the stored window by this many positions first (RoPE)
    compact: bool = False  # move the window back to the front of the buffer first
    write_sinks: bool = False  # (re)write the sinks in front of the window at `off`
    sink_deltas: tuple[int, ...] = (0,)  # rotation of the stored sinks (one per exact group)
    new_sinks: int = 0  # how many of the new tokens become sinks
    new_sink_delta: int = 0  # rotation applied to new sink keys before storing them
    kept: int = 0  # window length after the step
    rotated_sinks: torch.Tensor | None = None  # all layers' sinks, rotated once for this step
    unroll_head: int | None = None  # the window is stored as a ring from this slot: put it in order first
    slot: int = 0  # "ring" mode: buffer slot the new token is written to
    write_sink_values: bool = False  # "ring" mode: (re)write the sink values at the front


@dataclass
class Timeline:
    """Bookkeeping shared by all layers: counts and offsets, no tensors of the cache.

    Attributes:
        sink_size: number of attention-sink tokens kept (S).
        window_size: number of most recent tokens kept (W).
        capacity: slots per layer buffer.
        rotates: True for RoPE models (keys carry their position), False for ALiBi.
        follows_positions: True when the cache sees the caller's position ids and may
            suggest rebased positions through ``get_seq_length``.
        rebase_every: frame/in-cache drift (tokens) after which a rebase is suggested.
        ring_capable: True when single-token steps of a full cache may use the ring layout
            (RoPE: a lone query's attention does not depend on the order of the keys, whose
            positions are in their rotation); needs ``capacity == sink_size + window_size + 1``.
    """

    sink_size: int
    window_size: int
    capacity: int
    rotates: bool
    follows_positions: bool
    rebase_every: int
    ring_capable: bool = False
    seen: int = 0  # tokens of the stream processed so far (exact Python int, never wraps)
    n_sink: int = 0
    window: int = 0
    off: int = 0
    frame_next: int = 0  # model-frame position of the next token
    sink_frame: int = 0  # model-frame position the stored sink 0 is rotated at
    sinks_in_buffer: tuple[int, int] | None = (0, 0)  # (off, delta) of the sinks now at buffer[off:]
    exact_next: bool = False
    ring: bool = False  # the window is stored as a ring in buffer[S : S + W + 1], oldest token at `head`
    head: int = 0

    @property
    def length(self) -> int:
        """Tokens currently held (sinks + window)."""
        return self.n_sink + self.window

    def overflows(self, q: int) -> bool:
        """True when some of ``q`` new tokens would see more than the window under a causal mask:
        then only the exact layout (one sink copy per overflowing token) is exact."""
        return q > 1 and self.n_sink == self.sink_size and self.window + q - 1 > self.window_size

    def suggested_position(self) -> int:
        """The position the next token should be given (what ``get_seq_length`` returns)."""
        if self.seen == 0:
            return 0
        if not self.rotates:
            return self.length
        if self.follows_positions and self.frame_next - self.length >= self.rebase_every:
            return self.length
        return self.frame_next

    def plan(self, q: int, p0: int | None) -> Step:
        """Decide the layout of one forward pass of ``q`` new tokens whose first position is ``p0``.

        ``p0`` is the position the caller gave the first new token (None when the model does
        not pass position ids to the cache: it then used :meth:`suggested_position`). The
        timeline is advanced to the state after the step; the returned :class:`Step` tells
        every layer how to get there.
        """
        S, W = self.sink_size, self.window_size
        if p0 is None or not self.rotates:
            p0 = self.suggested_position()
        if self.seen == 0:
            self.frame_next = self.sink_frame = p0
        n = self.length
        step = Step(q=q, n=n, n_sink=self.n_sink, prev_off=self.off, off=self.off)
        step.new_sinks = min(q, S - self.n_sink)
        if self.rotates:
            step.shift = (p0 - self.frame_next) if self.window else 0
            step.sink_deltas = (p0 - n - self.sink_frame,)
            step.new_sink_delta = self.sink_frame + self.n_sink - p0
        ring_step = self.ring_capable and q == 1 and self.n_sink == S and self.window == W
        if self.ring and not ring_step:  # leaving the ring: the layers first put the window in order at S
            step.unroll_head, self.ring = self.head, False
            self.off = step.prev_off = step.off = 0
        if self.exact_next and self.overflows(q):
            # query i sees its own copy of the sinks, rotated for its own in-cache position
            step.mode = "exact"
            step.sink_deltas = tuple(step.sink_deltas[0] + g for g in range(self.window + q - W))
        elif ring_step:
            return self._plan_ring(step, p0)
        elif self.off + n + q > self.capacity:
            if n + q <= self.capacity:
                step.compact, step.off = True, 0
            else:
                step.mode = "concat"
        if step.mode == "view" and self.n_sink:
            step.write_sinks = self.sinks_in_buffer != (step.off, step.sink_deltas[0])
        self.exact_next = False
        window_after = self.window + q - step.new_sinks
        evict = max(0, window_after - W)
        step.kept = window_after - evict
        # commit the state after the step
        if step.mode == "view":
            self.sinks_in_buffer = (step.off, step.sink_deltas[0])
            if step.new_sinks and step.new_sink_delta:
                self.sinks_in_buffer = None
            self.off = step.off + evict
        else:  # the kept window is copied to buffer[S:]; the sinks are rewritten next step
            self.off, self.sinks_in_buffer = 0, None
        self.n_sink += step.new_sinks
        self.window = step.kept
        self.seen += q
        self.frame_next = p0 + q
        return step

    def _plan_ring(self, step: Step, p0: int) -> Step:
        """One token into a full cache, ring layout: the sinks sit at ``buffer[0:S]`` and the
        window in the ``W + 1`` slots after them, in any order; the new token takes the free
        slot, the whole buffer is attended to (its order is irrelevant to a single query), and
        the oldest window token's slot becomes the next free one. No per-token copy but the
        new token (and the sinks' keys when their rotation changes)."""
        S, W = self.sink_size, self.window_size
        head = self.head if self.ring else self.off + S  # an ordered window starts at off + S (off <= 1)
        step.mode, step.off = "ring", 0
        step.slot = head - 1 if head > S else S + W
        step.write_sinks = bool(S) and self.sinks_in_buffer != (0, step.sink_deltas[0])
        step.write_sink_values = bool(S) and not self.ring
        step.kept = W
        self.exact_next = False
        self.ring, self.head, self.off = True, S + (head - S + 1) % (W + 1), 0
        self.sinks_in_buffer = (0, step.sink_deltas[0])
        self.seen += 1
        self.frame_next = p0 + 1
        return step


# --------------------------------------------------------------------------------------
# The cache layer (tensors) and the cache (a list of layers sharing one timeline)
# --------------------------------------------------------------------------------------


class SinkCacheLayer(StaticLayer):
    """One layer's preallocated key/value buffer, driven by the shared :class:`Timeline`.

    Args:
        timeline: the bookkeeping shared by all layers of the cache.
        rotator: rotates keys by position differences (None for ALiBi models).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, timeline: Timeline, rotator: Rotator | None, index: int = 0):
        super().__init__(max_cache_len=timeline.capacity)
        self.index = index  # layer index: this layer's slice of the cache-wide sink tensors
        self.timeline = timeline
        self.rotator = rotator
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        S = self.timeline.sink_size  # sink_keys is a view of the cache-wide tensor, set by SinkCache
        self.sink_values = value_states.new_zeros((*value_states.shape[:2], S, value_states.shape[-1]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step, *args, **kwargs):
        """Carry out ``step``; return the keys/values the new tokens attend to, in cache order."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        K, V, s0, q = self.keys, self.values, step.n_sink, step.q
        W = self.timeline.window_size
        if step.unroll_head is not None and step.unroll_head != s0:  # ring -> window in order at s0
            h = step.unroll_head
            for buf in (K, V):
                buf[:, :, s0 : s0 + W].copy_(torch.cat((buf[:, :, h : s0 + W + 1], buf[:, :, s0 : h - 1]), dim=-2))
        if step.mode == "ring":
            self.prepare_ring(step)
            K.narrow(2, step.slot, 1).copy_(key_states)
            V.narrow(2, step.slot, 1).copy_(value_states)
            return K, V
        lo, hi = step.prev_off + s0, step.prev_off + step.n  # the stored window in the buffer
        if step.shift and hi > lo:  # the caller moved the position frame: follow it once
            cos, sin = self.rotator.cos_sin((step.shift,), K.device, K.dtype)
            self.rotator.rotate(K[:, :, lo:hi], cos, sin, out=K[:, :, lo:hi])
        if step.compact:
            K[:, :, s0 : step.n].copy_(K[:, :, lo:hi].clone())
            V[:, :, s0 : step.n].copy_(V[:, :, lo:hi].clone())
            lo, hi = s0, step.n
        if step.mode == "view":
            o = step.off
            if step.write_sinks:
                if step.rotated_sinks is not None:  # rotated once for all layers by the cache
                    K[:, :, o : o + s0].copy_(step.rotated_sinks[self.index, :, :, :s0])
                else:
                    self._rotated_sinks(step.sink_deltas, s0, out=K[:, :, o : o + s0])
                V[:, :, o : o + s0].copy_(self.sink_values[:, :, :s0])
            K[:, :, o + step.n : o + step.n + q].copy_(key_states)
            V[:, :, o + step.n : o + step.n + q].copy_(value_states)
            keys, values = K[:, :, o : o + step.n + q], V[:, :, o : o + step.n + q]
        else:
            groups = len(step.sink_deltas)
            sink_values = self.sink_values[:, :, :s0].repeat(1, 1, groups, 1)
            keys = torch.cat((self._rotated_sinks(step.sink_deltas, s0), K[:, :, lo:hi], key_states), dim=-2)
            values = torch.cat((sink_values, V[:, :, lo:hi], value_states), dim=-2)
        self._store_new_sinks(step, key_states, value_states)
        if step.mode != "view" and step.kept:  # keep the window tail at buffer[S:] for the next step
            s1 = s0 + step.new_sinks
            K[:, :, s1 : s1 + step.kept].copy_(keys[:, :, -step.kept :])
            V[:, :, s1 : s1 + step.kept].copy_(values[:, :, -step.kept :])
        return keys, values

    def prepare_ring(self, step: Step) -> None:
        """Everything a "ring" step does before the new token is written: follow a moved position
        frame (rotate the ring slots: the stored window and the free slot), write the sinks."""
        K, V, s0 = self.keys, self.values, step.n_sink
        if step.shift:
            ring = K.narrow(2, s0, self.timeline.window_size + 1)
            cos, sin = self.rotator.cos_sin((step.shift,), K.device, K.dtype)
            self.rotator.rotate(ring, cos, sin, out=ring)
        if step.write_sinks:
            if step.rotated_sinks is not None:  # rotated once for all layers by the cache
                K.narrow(2, 0, s0).copy_(step.rotated_sinks[self.index])
            else:
                self._rotated_sinks(step.sink_deltas, s0, out=K.narrow(2, 0, s0))
        if step.write_sink_values:
            V.narrow(2, 0, s0).copy_(self.sink_values)

    def _rotated_sinks(self, deltas: tuple[int, ...], n_sink: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The first ``n_sink`` stored sink keys rotated by each delta, one group after another.

        Written into ``out`` when given (the buffer slots in front of the window).
        """
        keys = self.sink_keys[:, :, :n_sink]
        if len(deltas) > 1:
            keys = keys.repeat(1, 1, len(deltas), 1)
        if self.rotator is None or deltas == (0,):
            return keys if out is None else out.copy_(keys)
        cos, sin = self.rotator.cos_sin(deltas, keys.device, keys.dtype, repeats=n_sink)
        return self.rotator.rotate(keys, cos, sin, out=out)

    def _store_new_sinks(self, step: Step, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        k, s0 = step.new_sinks, step.n_sink
        if not k:
            return
        new_keys = key_states[:, :, :k]
        if step.new_sink_delta and self.rotator is not None:
            cos, sin = self.rotator.cos_sin((step.new_sink_delta,), new_keys.device, new_keys.dtype)
            new_keys = self.rotator.rotate(new_keys, cos, sin)
        self.sink_keys[:, :, s0 : s0 + k].copy_(new_keys)
        self.sink_values[:, :, s0 : s0 + k].copy_(value_states[:, :, :k])

    def get_seq_length(self) -> int:
        return self.timeline.suggested_position()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.timeline.length + query_length, 0

    def get_max_length(self) -> int:
        return self.timeline.sink_size + self.timeline.window_size

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkCache cannot be cropped: evicted tokens are gone.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "sink_keys", "sink_values"):
                t = getattr(self, name)
                t.copy_(t.index_select(0, beam_idx.to(t.device)))


class SinkCache(Cache):
    """StreamingLLM's attention-sink cache for transformers 5 models.

    Args:
        model_or_config: the model (preferred: its rotary frequencies are read from it) or its
            config. Decides how positions are handled; unsupported families raise
            :class:`~streamingllm.families.UnsupportedModelError`.
        sink_size: number of initial tokens kept as attention sinks (tokens, >= 0). 0 gives
            plain window attention, the paper's baseline.
        window_size: number of most recent tokens kept (tokens, >= 1).
        slack: ALiBi families only: extra buffer slots (tokens) so eviction moves a view instead
            of copying; the window is copied back once every ``slack`` tokens. Default
            ``max(64, window_size // 4)``. RoPE families decode in a ring of exactly
            ``sink_size + window_size + 1`` slots and need none.
        rebase_every: how far (tokens) the positions given to the model may run ahead of the
            in-cache positions before ``get_seq_length`` suggests a rebase. Default
            ``max(window_size, 256)``; keeps the positions the model computes below about
            ``2 * (sink_size + window_size) + 256``.

    Usage: ``model(input_ids, cache=c)``, ``model.generate(..., cache=c)`` or a manual loop.
    """

    def __init__(
        self,
        model_or_config,
        sink_size: int = 4,
        window_size: int = 1020,
        *,
        slack: int | None = None,
        rebase_every: int | None = None,
    ):
        sink_size = check_int("sink_size", sink_size, 0)
        window_size = check_int("window_size", window_size, 1)
        slack = max(64, window_size // 4) if slack is None else check_int("slack", slack, 0)
        rebase_every = max(window_size, 256) if rebase_every is None else check_int("rebase_every", rebase_every, 1)
        config = model_or_config.config if isinstance(model_or_config, torch.nn.Module) else model_or_config
        if config is None or not hasattr(config, "model_type"):
            raise TypeError(f"model_or_config must be a transformers model or config, got {type(model_or_config).__name__}")
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        family = family_of(config)
        _check_fits(config, family, sink_size, window_size)
        self.family: Family = family
        self.sink_size, self.window_size = sink_size, window_size
        rotator = Rotator(rope_inv_freq(model_or_config)) if family.positions == "rope" else None
        self.timeline = Timeline(
            sink_size=sink_size,
            window_size=window_size,
            capacity=sink_size + window_size + 1 + (0 if rotator is not None else slack),
            ring_capable=rotator is not None,
            rotates=rotator is not None,
            follows_positions=family.positions_visible,
            rebase_every=rebase_every,
        )
        self.num_layers = config.num_hidden_layers
        self._step: Step | None = None
        self._sink_keys: torch.Tensor | None = None  # (layers, batch, kv_heads, sink_size, head_dim)
        self._sinks_rotated: torch.Tensor | None = None
        self._prepared = False  # prepare_decode_step() did the bookkeeping of the next forward
        self._slot: torch.Tensor | None = None  # (1,) int64: buffer slot of the prepared step's token
        self._position: torch.Tensor | None = None  # (1, 1) int64: its position id (both made with the sinks)
        super().__init__(layers=[SinkCacheLayer(self.timeline, rotator, i) for i in range(self.num_layers)])

    # --- the transformers Cache API -------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new keys/values of layer ``layer_idx`` and return those to attend to."""
        if self._prepared:  # static step: no Python-side decision, shapes never change
            if key_states.shape[-2] != 1:
                raise ValueError("prepare_decode_step() prepared a single-token step; this forward has "
                                 f"{key_states.shape[-2]} tokens")
            layer = self.layers[layer_idx]
            layer.keys.index_copy_(2, self._slot, key_states)
            layer.values.index_copy_(2, self._slot, value_states)
            if layer_idx == self.num_layers - 1:
                self._prepared = False
            return layer.keys, layer.values
        if layer_idx == 0:
            if self._sink_keys is None:
                self._allocate_sink_keys(key_states)
            self._step = self.timeline.plan(key_states.shape[-2], _first_position(kwargs, key_states.shape[0]))
            self._rotate_all_sinks(self._step)
        return self.layers[layer_idx].update(key_states, value_states, self._step)

    def _allocate_sink_keys(self, key_states: torch.Tensor) -> None:
        """One tensor for the sink keys of all layers (they all have the same shape), so that
        the sinks of every layer can be rotated at once."""
        shape = (self.num_layers, *key_states.shape[:2], self.sink_size, key_states.shape[-1])
        self._sink_keys = key_states.new_zeros(shape)
        self._sinks_rotated = torch.empty_like(self._sink_keys)
        self._slot = torch.zeros(1, dtype=torch.long, device=key_states.device)
        self._position = torch.zeros((1, 1), dtype=torch.long, device=key_states.device)
        for i, layer in enumerate(self.layers):
            layer.sink_keys = self._sink_keys[i]

    def _rotate_all_sinks(self, step: Step) -> None:
        """Rotate the sinks of every layer at once (one set of small ops per step, not per layer)."""
        rotator = self.layers[0].rotator
        if rotator is not None and step.mode in ("view", "ring") and step.write_sinks and step.sink_deltas != (0,):
            s0, keys = step.n_sink, self._sink_keys
            cos, sin = rotator.cos_sin(step.sink_deltas, keys.device, keys.dtype, repeats=s0)
            step.rotated_sinks = rotator.rotate(self._sink_keys[..., :s0, :], cos, sin, out=self._sinks_rotated[..., :s0, :])

    def prepare_decode_step(self) -> torch.Tensor | None:
        """Do the bookkeeping of the next single-token forward now, before the model runs.

        Once the cache is full, a RoPE model's single-token steps use the ring layout: this plans
        the next one, follows a position rebase, rotates and writes the sinks, and returns the
        position ids (a (1, 1) int64 tensor, reused) to pass to the model:
        ``model(input_ids=tok, cache=c, position_ids=c.prepare_decode_step())``. Inside that
        forward each layer's update is then two ``index_copy_`` of the new key/value into fixed
        buffers, attended to whole: static shapes, no Python-side decisions and no recompilation
        per token, so the forward can be compiled with ``torch.compile(model.forward)``.
        The results are identical to an ordinary step.

        Returns None (nothing done) when the next step cannot be prepared -- the cache is not full
        yet, or the family is ALiBi: call the model without position ids then.
        """
        t = self.timeline
        if not (t.ring_capable and self._sink_keys is not None and t.n_sink == t.sink_size and t.window == t.window_size):
            return None
        p = t.suggested_position()
        step = t.plan(1, p)
        self._rotate_all_sinks(step)
        for layer in self.layers:
            layer.prepare_ring(step)
        self._slot.fill_(step.slot)
        self._position.fill_(p)
        self._prepared = True
        return self._position

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """In-cache index of the first new token (the attention mask is built in cache order)."""
        return self.timeline.length

    def reset(self) -> None:
        super().reset()
        t = self.timeline
        t.seen = t.n_sink = t.window = t.off = t.frame_next = t.sink_frame = 0
        t.sinks_in_buffer, t.exact_next, t.ring, t.head = (0, 0), False, False, 0
        self._prepared = False

    # --- streaming helpers ------------------------------------------------------------

    @property
    def seen_tokens(self) -> int:
        """Tokens of the stream processed so far (exact, unbounded)."""
        return self.timeline.seen

    @property
    def cached_tokens(self) -> int:
        """Tokens whose KV is held now (at most ``sink_size + window_size``)."""
        return self.timeline.length

    @property
    def max_cached_tokens(self) -> int:
        return self.sink_size + self.window_size

    def exact_chunk_mask(self, q: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor | None:
        """Prepare the next forward of ``q`` tokens for exact banded attention.

        Returns the additive 4D mask (1, 1, q, keys) to pass as ``attention_mask``, or None when
        the ordinary causal mask is already exact (the window does not overflow inside the
        chunk). Every token then sees exactly the sinks plus its own last ``window_size``
        tokens, at the positions it would have had if fed one by one.
        """
        t = self.timeline
        if not t.overflows(q):
            return None
        if self.family.positions != "rope":
            raise UnsupportedModelError(
                f"exact chunked attention is not available for {self.family.name} (ALiBi): feed it token by token"
            )
        t.exact_next = True
        W, w, S = t.window_size, t.window, t.n_sink
        i = torch.arange(q)[:, None]
        groups = (i[:, 0] + w - W).clamp(min=0)
        n_groups = int(groups[-1]) + 1
        own_window = (w + i).clamp(max=W)  # tokens each query sees besides sinks and itself
        g = torch.arange(n_groups * S)[None, :] // max(S, 1)
        sink_ok = g == groups[:, None]
        u = torch.arange(w + q)[None, :]  # window then new keys; distance to query i:
        dist = (i + w) - u
        recent_ok = (dist >= 0) & (dist <= own_window)
        allowed = torch.cat((sink_ok, recent_ok), dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None].to(device) if device is not None else mask[None, None]


def _first_position(kwargs: dict, batch: int) -> int | None:
    """The first position id of this forward, if the model passed position ids to the cache."""
    inner = kwargs.get("kwargs", kwargs)
    pos = inner.get("position_ids") if isinstance(inner, dict) else None
    if pos is None:
        return None
    pos = pos.reshape(-1, pos.shape[-1]) if pos.dim() > 1 else pos[None]
    if pos.shape[0] > 1 and bool((pos != pos[:1]).any()):
        raise ValueError(
            "SinkCache: the rows of this batch have different position ids (left padding?). "
            "Streams in one batch must have equal lengths and no padding."
        )
    return int(pos[0, 0])


def _check_fits(config, family: Family, sink_size: int, window_size: int) -> None:
    """Refuse cache sizes the model's own masking or bias tables would silently break."""
    total = sink_size + window_size
    sliding = sliding_window_of(config, family)
    if sliding is not None and total >= sliding:
        raise ValueError(
            f"sink_size + window_size = {total} must be < the model's sliding_window ({sliding}) for "
            f"{family.name}: its own sliding-window mask would hide the attention sinks. "
            f"Use window_size <= {sliding - sink_size - 1}."
        )
    limit = alibi_limit(config)
    if limit is not None and total + 1 > limit:
        raise ValueError(
            f"sink_size + window_size + 1 = {total + 1} exceeds the ALiBi table of {family.name} "
            f"(max_seq_len={limit}). Use window_size <= {limit - sink_size - 1}."
        )
