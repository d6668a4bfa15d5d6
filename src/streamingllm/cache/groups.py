"""Per-layer-type policies: which tokens each layer keeps, and what the layers of one policy share.

Full-attention layers are **global**: ``sink_size`` sinks + ``window_size`` recent tokens, at
in-cache positions. A hybrid model's (Gemma 2/3, gpt-oss) sliding-window layers are **sliding**:
exactly the model's own window (``sliding_window - 1`` past tokens and the new one), no sinks, in
the same position frame, as the model was trained. Each policy is a :class:`LayerGroup` with its
own timeline, sink store, buffers and rotator (its own RoPE frequencies); a model without sliding
layers has one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..families import FULL, Family, layer_types_of, rope_inv_freq, sliding_window_of
from ..rotation import Rotator, compute_dtype
from ..timeline import RingStep, Step, Timeline, ViewStep
from .store import LayerBuffers, SinkStore

Policy = Literal["global", "sliding"]
GLOBAL: Policy = "global"
SLIDING_POLICY: Policy = "sliding"


def layer_policies(config, family: Family, sink_size: int, window_size: int) -> list[Policy]:
    """Which tokens each layer keeps: ``"global"`` (``sink_size`` sinks + ``window_size`` recent
    tokens, at in-cache positions) or ``"sliding"`` (the model's own window, no sinks).

    Full-attention layers are global. Sliding-window layers keep their native window, as the model
    was trained, except in a model whose layers all slide (Mistral with ``sliding_window``) over a
    window longer than the cache asked for (``sink_size + window_size < sliding_window``): every
    layer is then global, and the model's own mask never reaches past what the cache holds.
    """
    types = layer_types_of(config, family)
    window = sliding_window_of(config, family)
    if FULL not in types and window is not None and sink_size + window_size < window:
        return [GLOBAL] * len(types)
    return [GLOBAL if t == FULL else SLIDING_POLICY for t in types]


@dataclass(eq=False)
class LayerGroup:
    """The layers that keep tokens by one policy, and what they share.

    Attributes:
        policy: ``"global"`` or ``"sliding"`` (see :func:`layer_policies`).
        layer_type: the model's attention type of these layers (:data:`~streamingllm.families.FULL`
            or :data:`~streamingllm.families.SLIDING`), which picks their RoPE frequencies.
        layers: the cache's indices of these layers, in order.
        timeline: their bookkeeping (sliding layers: ``S = 0``, ``W = sliding_window - 1``).
        sinks: their stored sink keys (empty when ``S = 0``).
        rotator: their rotation (None for ALiBi); the one owner of it, which the layers and the
            sink store read.
        buffers: their key/value buffers (allocated with the sink store).
        step: the step of the running forward.
        slots: per device, (1,) int64: the buffer slot of a prepared decode step's token.
    """

    policy: Policy
    layer_type: str
    layers: list[int]
    timeline: Timeline
    sinks: SinkStore
    rotator: Rotator | None
    buffers: LayerBuffers | None = None
    step: Step | None = None
    slots: dict = field(default_factory=dict)

    @property
    def full(self) -> bool:
        """The group holds as many tokens as it keeps (a single token is a ring step)."""
        t = self.timeline
        return t.ring_capable and self.sinks.allocated and t.n_sink == t.sink_size and t.window == t.window_size

    def allocate(self, key_states: torch.Tensor, follow_keys: bool) -> None:
        """Allocate the sink store and (lazily, at the layers' first update) the buffers for keys
        shaped like ``key_states``; ``follow_keys``: put everything on their device (the model moved
        since the cache was built)."""
        if follow_keys:
            self.sinks.layer_devices = None
        self.sinks.allocate(len(self.layers), key_states, self.timeline.sink_size)
        self.buffers = LayerBuffers(self.sinks.layout)
        self.slots = {key_states.device: torch.zeros(1, dtype=torch.long, device=key_states.device)}

    def plan(self, q: int, p0: int | None, sink_scores: bool = False) -> Step:
        """Plan this forward's step (see :meth:`~streamingllm.timeline.Timeline.plan`) and rotate the
        sinks of every layer of the group at once (one set of small ops per step, not per layer); a
        ring step writes them straight into every layer's buffer."""
        step = self.step = self.timeline.plan(q, p0, sink_scores)
        if isinstance(step, RingStep) and step.write_sinks and self.buffers is not None and self.buffers.keys:
            self.sinks.rotate_into(self.buffers, step.n_sink, step.sink_delta)
        elif isinstance(step, (ViewStep, RingStep)) and step.write_sinks:
            self.sinks.rotate_all(step.n_sink, step.sink_delta)
        else:
            self.sinks.rotated_for = None
        return step

    def estimated_bytes(self, key_states: torch.Tensor) -> int:
        """Bytes the group's tensors take for keys/values shaped like ``key_states`` (B, H, T, D): each
        layer's buffer and sink values in the keys' dtype, its stored sinks at the stored precision."""
        batch, heads, _, dim = key_states.shape
        size = key_states.element_size()
        stored = torch.empty((), dtype=compute_dtype(key_states.dtype)).element_size()
        t = self.timeline
        per_slot = (2 * t.capacity + 2 * t.sink_size) * size + t.sink_size * stored
        return len(self.layers) * batch * heads * dim * per_slot

    def tensors(self) -> list[torch.Tensor]:
        """The group's own tensors: stored and rotated sinks, prepared slot indices (the buffers are
        counted by the layers, which hold views of them)."""
        return [*self.sinks.tensors(), *self.slots.values()]


def build_groups(config, family: Family, model_or_config, sink_size: int, window_size: int, *, slack: int,
                 rebase_every: int, fast_chunks: bool, devices: list[torch.device] | None,
                 rotators: dict[str, Rotator] | None = None) -> list[LayerGroup]:
    """One :class:`LayerGroup` per policy the model's layers follow, the global group first.

    Args:
        config: the model's text config.
        family: its family row.
        model_or_config: the model (RoPE frequencies are read from its buffers) or the config.
        sink_size, window_size: the global layers' sizes (tokens).
        slack: ALiBi buffers' extra slots (tokens).
        rebase_every: drift (tokens) after which positions are rebased.
        fast_chunks: the cache's ``fast_chunks`` option.
        devices: the device of each layer, where known.
        rotators: rotators to share, by layer type (the rows of a padded batch use their cache's).
    """
    policies = layer_policies(config, family, sink_size, window_size)
    types = layer_types_of(config, family)
    rope = family.positions == "rope"
    groups = []
    for policy in (GLOBAL, SLIDING_POLICY):
        members = [i for i, p in enumerate(policies) if p == policy]
        if not members:
            continue
        S, W = (sink_size, window_size) if policy == GLOBAL else (0, sliding_window_of(config, family) - 1)
        timeline = Timeline(sink_size=S, window_size=W, capacity=S + W + 1 + (0 if rope else slack),
                            ring_capable=rope, rotates=rope, follows_positions=family.positions_visible,
                            rebase_every=rebase_every, fast_chunks=fast_chunks, masks_itself=policy == SLIDING_POLICY)
        layer_type = types[members[0]]
        rotator = None
        if rope:
            rotator = (rotators or {}).get(layer_type) or Rotator(rope_inv_freq(model_or_config, layer_type))
        group_devices = None if devices is None else [devices[i] for i in members]
        groups.append(LayerGroup(policy, layer_type, members, timeline, SinkStore(rotator, group_devices), rotator))
    return groups
