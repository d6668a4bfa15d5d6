"""The prepared decode step: a single-token forward's bookkeeping done before the model runs; and
the position ids handed out for it (:class:`HandedIds`).

Once a RoPE cache is full, every decode step is a ring step of the same shapes.
:meth:`PreparedStep.prepare` plans it in every group, follows a position rebase, rotates and writes
the sinks and fills the slot indices, so that the forward that follows only writes its key/value into
a fixed slot of each layer (static shapes: compilable, CUDA-graph friendly). It keeps what it
changed, so :meth:`PreparedStep.undo` puts the timelines back when that forward never comes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..timeline import RingStep
from .groups import LayerGroup


@dataclass
class PreparedStep:
    """A prepared single-token step, until its forward has run through every layer.

    Attributes:
        position: the position id the step was prepared for.
        before: per group, its timeline's :meth:`~streamingllm.timeline.Timeline.snapshot` before.
        steps: per group, the ring step planned.
        shifted: how many layers (from layer 0) have had their ring prepared; an interrupted
            preparation finishes the position shift in the others when undone.
    """

    position: int
    before: list[dict]
    steps: list[RingStep]
    shifted: int = 0

    @classmethod
    def prepare(cls, groups: list[LayerGroup], layers: list, group_of: list[LayerGroup], position: int,
                on_planned=None) -> PreparedStep:
        """Plan the step at ``position`` in every group and prepare every layer's ring.

        ``on_planned(step)`` receives the step as soon as the timelines have moved, so that the
        owner can undo it if what follows fails.
        """
        before = [group.timeline.snapshot() for group in groups]
        prepared = cls(position, before, [group.plan(1, position) for group in groups])
        if on_planned is not None:
            on_planned(prepared)
        for i, layer in enumerate(layers):
            layer.prepare_ring(group_of[i].step)
            prepared.shifted = i + 1
        for group in groups:
            for slot in group.slots.values():
                slot.fill_(group.step.slot)
        return prepared

    def write(self, layer, slots: dict, key_states: torch.Tensor, value_states: torch.Tensor):
        """The prepared forward's update of one layer: two ``index_copy_`` into its buffers, which it
        attends to whole. ``slots``: the layer's group's slot index per device."""
        slot = slots.get(key_states.device)
        if slot is None:  # a layer on another device (device_map): its own copy of the slot index
            slot = slots[key_states.device] = next(iter(slots.values())).to(key_states.device)
        layer.keys.index_copy_(2, slot, key_states)
        layer.values.index_copy_(2, slot, value_states)
        return layer.keys, layer.values

    def undo(self, groups: list[LayerGroup], layers: list, group_of: list[LayerGroup]) -> None:
        """Undo a step whose forward did not run (or not to the end): the timelines go back to before
        it and the sinks are rewritten at the next step. The prepared token's slot was free, so
        writes to it harm nothing.

        A step that moved the position frame (a rebase) is not rotated back, which would round the
        window twice in 16-bit dtypes: the ring keeps the new frame (every layer's, finishing what an
        interrupted preparation left), and the restored timeline records it."""
        for i in range(self.shifted, len(layers)):
            step = self.steps[groups.index(group_of[i])]
            if step.shift:
                layers[i].shift_ring(step.shift)
        for group, was, step in zip(groups, self.before, self.steps):
            group.timeline.restore(was, frame_shift=step.shift)
            group.sinks.rotated_for = None


class HandedIds:
    """The position ids last handed to a caller, so that when the forward passes them back to the
    cache their first position is known without reading the device (no host sync on a GPU). The
    ids are kept alive, so no other tensor can take their memory while they are remembered."""

    def __init__(self):
        self._handed: tuple | None = None  # (ids, their version, first position)

    def hand_out(self, positions: torch.Tensor, p: int) -> torch.Tensor:
        """Remember ``positions`` (first one ``p``) and return them."""
        self._handed = (positions, positions._version, p)
        return positions

    def first(self, positions: torch.Tensor) -> int:
        """The first position id of ``positions`` (rows, q): the remembered one when they are the ids
        handed out, unmodified since; else read from the tensor."""
        h = self._handed
        if (h is not None and positions.data_ptr() == h[0].data_ptr() and positions._version == h[1]
                and positions.numel() == h[0].numel()):
            return h[2]
        return int(positions[0, 0])
