"""One layer's preallocated key/value buffer, carrying out the steps its group's timeline plans.

Contract (that of transformers' cache layers): :meth:`SinkLayer.update` stores the new tokens' keys
and values as the step planned and returns the keys/values they attend to, in cache order
``[sinks | window | new]``.

* :class:`SinkLayer` keeps keys as the model gave them: ALiBi families, whose bias is the key's index
  in the attended tensor (already its in-cache position). Its buffer has ``slack`` extra slots, so
  that eviction moves a view by one slot and the window is compacted once every ``slack`` tokens.
* :class:`RopeSinkLayer` adds what RoPE needs: keys carry their position in their rotation, so the
  sinks are rotated per step (by the group's :class:`~streamingllm.cache.store.SinkStore`), the
  window follows a rebased position frame, and single tokens into a full cache use the ring layout
  (:class:`~streamingllm.timeline.RingStep`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer

from ..attention import SinkScores, attach_sink_scores
from ..rotation import compute_dtype
from ..timeline import ConcatStep, RingStep, Step, ViewStep


class SinkLayer(StaticLayer):
    """One layer's buffer (batch, kv_heads, capacity, head_dim): a view of its group's
    :class:`~streamingllm.cache.store.LayerBuffers`.

    Args:
        group: the :class:`~streamingllm.cache.groups.LayerGroup` the layer belongs to (its
            timeline, sink store, buffers and rotator).
        index: this layer's index within the group.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, group, index: int = 0):
        super().__init__(max_cache_len=group.timeline.capacity)
        self.group, self.index = group, index
        self.is_sliding = group.policy == "sliding"  # transformers sizes the sliding masks from these
        self.sink_values: torch.Tensor | None = None  # (batch, kv_heads, S, head_dim)

    @property
    def timeline(self):
        return self.group.timeline

    @property
    def sinks(self):
        return self.group.sinks

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate as transformers' static layers do, but hold views of the group's buffers (so a
        ring step writes every layer's sinks at once)."""
        super().lazy_initialization(key_states, value_states)
        if self.sinks.allocated:
            self.keys, self.values = self.group.buffers.views(self.index, key_states, value_states,
                                                              self.max_cache_len)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.keys)
                torch._dynamo.mark_static_address(self.values)
        S = self.timeline.sink_size
        self.sink_values = value_states.new_zeros((*value_states.shape[:2], S, value_states.shape[-1]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step, *args, **kwargs):
        """Carry out ``step``; return the keys/values the new tokens attend to, in cache order."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if isinstance(step, ViewStep):
            return self._view(step, key_states, value_states)
        return self._concat(step, key_states, value_states)

    def _view(self, step: ViewStep, key_states: torch.Tensor, value_states: torch.Tensor):
        """Attend to ``buffer[off : off + n + q]``: sinks, window, then the new tokens."""
        K, V, s0 = self.keys, self.values, step.n_sink
        lo, hi = self._stored_window(step)
        if step.compact:  # the view reached the buffer's end: move the window to the front
            K[:, :, s0 : step.n].copy_(K[:, :, lo:hi].clone())
            V[:, :, s0 : step.n].copy_(V[:, :, lo:hi].clone())
        o = step.off
        if step.write_sinks:
            self.sinks.for_layer(self.index, s0, (step.sink_delta,), out=K[:, :, o : o + s0])
            V[:, :, o : o + s0].copy_(self.sink_values[:, :, :s0])
        K[:, :, o + step.n : o + step.n + step.q].copy_(key_states)
        V[:, :, o + step.n : o + step.n + step.q].copy_(value_states)
        self._store_new_sinks(step, key_states, value_states)
        return K[:, :, o : o + step.n + step.q], V[:, :, o : o + step.n + step.q]

    def _concat(self, step: ConcatStep, key_states: torch.Tensor, value_states: torch.Tensor):
        """Attend to a fresh ``[sinks | window | new]`` tensor (a chunk the buffer cannot hold, or an
        exact chunk: one copy of the sinks per group, or one zero-key copy scored by the attention)."""
        K, V, s0 = self.keys, self.values, step.n_sink
        lo, hi = self._stored_window(step)
        copied = s0
        if step.groups > 1:  # exact: every query sees the sinks where it needs them, new ones included
            self._store_new_sinks(step, key_states, value_states)
            copied = s0 + step.new_sinks
        if step.sink_scores:  # the attention computes each query's sink logits: one zero-key copy
            sink_keys = key_states.new_zeros((*key_states.shape[:2], copied, key_states.shape[-1]))
            sink_values = self.sink_values[:, :, :copied]
        else:  # one rotated copy of the sinks per group
            sink_keys = self.sinks.for_layer(self.index, copied, step.sink_deltas)
            sink_values = self.sink_values[:, :, :copied].repeat(1, 1, step.groups, 1)
        keys = torch.cat((sink_keys, K[:, :, lo:hi], key_states), dim=-2)
        values = torch.cat((sink_values, V[:, :, lo:hi], value_states), dim=-2)
        if step.sink_scores:
            cos, sin = self.group.rotator.cos_sin(step.query_sink_deltas, keys.device, compute_dtype(keys.dtype))
            attach_sink_scores(keys, SinkScores(self.sinks.stored(self.index)[:, :, :copied], cos, sin,
                                                self.group.rotator))
        if step.groups == 1:
            self._store_new_sinks(step, key_states, value_states)
        if step.kept:  # evict: keep the window's tail at buffer[S:]
            s1 = s0 + step.new_sinks
            K[:, :, s1 : s1 + step.kept].copy_(keys[:, :, -step.kept :])
            V[:, :, s1 : s1 + step.kept].copy_(values[:, :, -step.kept :])
        return keys, values

    def _stored_window(self, step: ViewStep | ConcatStep) -> tuple[int, int]:
        """Buffer slots ``[lo, hi)`` of the window held before the step."""
        return step.prev_off + step.n_sink, step.prev_off + step.n

    def _store_new_sinks(self, step: Step, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        k, s0 = step.new_sinks, step.n_sink
        if k:
            self.sinks.store(self.index, s0, key_states[:, :, :k], step.new_sink_delta)
            self.sink_values[:, :, s0 : s0 + k].copy_(value_states[:, :, :k])

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies (batch, kv_heads, slots, head_dim) of the window's keys and values, in the order the
        layer attends to them: what a saved state keeps of this layer besides its sinks (whose keys
        the sink store keeps). A decode ring is kept whole (its ``W + 1`` slots, the free one too),
        so that the restored keys sum in the same order and the logits stay bit for bit the same."""
        t = self.timeline
        lo, n = t.off + t.n_sink, t.window + (1 if t.ring else 0)
        return self.keys[:, :, lo : lo + n].clone(), self.values[:, :, lo : lo + n].clone()

    def place(self, keys: torch.Tensor, values: torch.Tensor, sink_values: torch.Tensor) -> None:
        """Put a saved window (:meth:`held`) back, right after the sinks, where the timeline (restored
        in its compacted form: :meth:`~streamingllm.timeline.Timeline.compacted`) expects it, and the
        sinks' values before it (a ring does not rewrite them; the sinks' keys are rewritten at the
        next step from the sink store)."""
        s0 = self.timeline.n_sink
        self.sink_values.copy_(sink_values)
        self.values[:, :, :s0].copy_(sink_values[:, :, :s0])
        self.keys[:, :, s0 : s0 + keys.shape[-2]].copy_(keys)
        self.values[:, :, s0 : s0 + values.shape[-2]].copy_(values)

    def get_seq_length(self) -> int:
        return self.timeline.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.timeline.length + query_length, 0

    def get_max_length(self) -> int:
        return self.timeline.sink_size + self.timeline.window_size

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkCache cannot be cropped: evicted tokens are gone.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for t in (self.keys, self.values, self.sink_values):
                t.copy_(t.index_select(0, beam_idx.to(t.device)))
            self.sinks.reorder(self.index, beam_idx)


#: ALiBi layers are :class:`SinkLayer` unchanged (the name is kept for code that imported it).
AlibiSinkLayer = SinkLayer


class RopeSinkLayer(SinkLayer):
    """RoPE: sinks rotated per step, the window rotated once when the caller rebases its positions,
    and the ring layout for single tokens into a full cache."""

    @property
    def rotator(self):
        return self.group.rotator

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if step.unroll_head is not None and step.unroll_head != step.n_sink:
            self._unroll(step.unroll_head, step.n_sink)
        if not isinstance(step, RingStep):
            return super().update(key_states, value_states, step)
        self.prepare_ring(step)
        self.keys.narrow(2, step.slot, 1).copy_(key_states)
        self.values.narrow(2, step.slot, 1).copy_(value_states)
        return self.keys, self.values

    def _unroll(self, head: int, s0: int) -> None:
        """Leave the ring: put the window in stream order at ``buffer[s0 : s0 + W]``."""
        W = self.timeline.window_size
        for buf in (self.keys, self.values):
            buf[:, :, s0 : s0 + W].copy_(torch.cat((buf[:, :, head : s0 + W + 1], buf[:, :, s0 : head - 1]), dim=-2))

    def prepare_ring(self, step: RingStep) -> None:
        """Everything a ring step does before the new token is written: follow a moved position
        frame (rotate the ring's slots), write the sinks' keys (and, on entering, values)."""
        K, s0 = self.keys, step.n_sink
        if step.shift:
            self.shift_ring(step.shift)
        if step.write_sinks and not self.group.buffers.keys:  # else written for all layers at once
            self.sinks.for_layer(self.index, s0, (step.sink_delta,), out=K.narrow(2, 0, s0))
        if step.write_sink_values:
            self.values.narrow(2, 0, s0).copy_(self.sink_values)

    def shift_ring(self, shift: int) -> None:
        """Rotate the ring's keys (the window and the free slot) by ``shift`` positions."""
        ring = self.keys.narrow(2, self.timeline.sink_size, self.timeline.window_size + 1)
        self.rotator.rotate_by(ring, (shift,), out=ring)

    def _stored_window(self, step: ViewStep | ConcatStep) -> tuple[int, int]:
        lo, hi = super()._stored_window(step)
        if step.shift and hi > lo:  # the caller moved the position frame: follow it once
            self.rotator.rotate_by(self.keys[:, :, lo:hi], (step.shift,), out=self.keys[:, :, lo:hi])
        return lo, hi
