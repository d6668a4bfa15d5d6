"""The attention-sink KV cache: which tokens to keep, and at which positions.

StreamingLLM semantics (Xiao et al., 2024): after every step the cache holds the KV of the
first ``sink_size`` tokens of the stream (the attention sinks) and of the last
``window_size`` tokens. The next token attends to those and to itself, at positions
``0 .. sink_size + window_size`` *inside the cache*, whatever positions the caller used.

Where things happen (details in docs/design.md):

* **Which tokens are kept, and where they sit**: :class:`~streamingllm.timeline.Timeline`
  plans every forward pass as counts and offsets (one ``Step`` per layout); no tensors.
* **Where a token is stored and evicted**: the layer classes below carry a step out on one
  layer's preallocated buffer. :class:`SinkLayer` holds the ordered layouts (a view of the
  buffer, or a fresh tensor for long chunks); :class:`AlibiSinkLayer` is it unchanged (the
  ALiBi bias is the key's index in the view, already its in-cache position);
  :class:`RopeSinkLayer` adds rotation and the ring used for single-token decoding.
* **Where a key is rotated**: RoPE keys carry their position in their rotation. The window is
  contiguous in the stream, so a window key's distance to the query never changes and it
  keeps the model's rotation; only the sinks' distance changes, so only the sink keys are
  rotated, once per step, from a stored copy (:class:`SinkKeys`, never rotated twice, angles in
  float64 from integer differences). When the caller rebases its positions (the library's own
  loops do, see :meth:`SinkCache.position_ids`) the stored window is rotated once to follow.
* **What the model is told**: ``get_seq_length()`` is the number of tokens consumed, as
  transformers expects (``generate()`` slices the new tokens of a conversation with it, and
  models without position ids put the next token there).
* **Hybrid models** (Gemma 2/3, gpt-oss): each layer follows the policy of its attention type
  (:func:`layer_policies`). Global layers keep sinks + window at in-cache positions; sliding
  layers keep exactly the model's own window (``sliding_window - 1`` tokens and the new one), no
  sinks, in the same position frame, as the model was trained. Each policy is a
  :class:`LayerGroup`: its own timeline, sink store and rotator (its own RoPE base).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers.cache_utils import Cache, StaticLayer

from .attention import (BAND_AWARE, SINK_ATTENTION, SinkScores, attach_band, attach_sink_scores,
                        attention_implementation, is_sink_attention, use_sink_attention)
from .checks import ArgumentError, check_int
from .compat import check_transformers, text_config
from .families import (FULL, SLIDING, Family, UnsupportedModelError, alibi_limit, check_rope_scaling, family_of,
                       layer_types_of, past_trained_length, rope_inv_freq, sliding_window_of)
from .memory import available_bytes
from .rotation import Rotator, compute_dtype
from .rows import PaddedRows
from .timeline import ConcatStep, RingStep, Step, Timeline, ViewStep


class CacheTooLargeError(ArgumentError):
    """The cache asked for would not fit in the device's memory (names ``window_size``)."""


class TrainedLengthWarning(UserWarning):
    """The cache is longer than the model's trained length: positions past it were never trained."""


class SinkKeys:
    """The stored sink keys of every layer, one tensor (layers, batch, kv_heads, S, head_dim) per
    device the layers sit on, so that one step rotates all layers' sinks with one set of ops per
    device (one device unless the model is split with ``device_map``); and the layers' key/value
    buffers, one (layers, batch, kv_heads, slots, head_dim) tensor each per device, whose views the
    layers hold, so that a ring step writes every layer's rotated sinks with one set of ops.

    Stored keys are in the frame of the stream's first token, in at least float32 (bf16/fp16 sinks
    are rotated from a float32 copy and rounded once, so their error does not grow with the
    stream); :meth:`rotate_all` writes this step's rotation of them, in the model's dtype, into a
    second tensor per device that the layers copy from, or (:meth:`rotate_into_buffers`) straight
    into the first slots of every layer's buffer.

    Args:
        rotator: rotates keys by position differences (None for ALiBi: nothing is rotated).
        layer_devices: the device of each layer, where known (None: all on the device of the
            first keys the cache sees).
    """

    def __init__(self, rotator: Rotator | None, layer_devices: list[torch.device] | None = None):
        self.rotator = rotator
        self.layer_devices = layer_devices
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (stored, rotated) per device
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (keys, values) of all layers, per device
        self.where: list[tuple[int, int]] = []  # per layer: (group, index in the group)
        self.rotated_for: tuple[int, int] | None = None  # (n_sink, delta) that the rotated tensors hold

    @property
    def allocated(self) -> bool:
        return bool(self.groups)

    def allocate(self, num_layers: int, key_states: torch.Tensor, sink_size: int) -> None:
        devices = self.layer_devices or [key_states.device] * num_layers
        order = list(dict.fromkeys(devices))  # each device once, in layer order
        self.where = [(order.index(d), devices[:i].count(d)) for i, d in enumerate(devices)]
        self.groups, self.buffers = [], []
        for device in order:
            shape = (devices.count(device), *key_states.shape[:2], sink_size, key_states.shape[-1])
            stored = torch.zeros(shape, dtype=compute_dtype(key_states.dtype), device=device)
            self.groups.append((stored, torch.empty(shape, dtype=key_states.dtype, device=device)))

    def tensors(self) -> list[torch.Tensor]:
        """The stored and rotated sink keys (the layers' buffers are counted by the layers)."""
        return [t for group in self.groups for t in group]

    def layer_buffers(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, slots: int):
        """Views (batch, kv_heads, slots, head_dim) of the all-layer buffers for layer ``layer``'s keys
        and values, allocating those buffers (zeros) at the first call, shaped like the given states."""
        if not self.buffers:
            for stored, _ in self.groups:
                count, shape = stored.shape[0], (*key_states.shape[:2], slots)
                self.buffers.append((key_states.new_zeros((count, *shape, key_states.shape[-1]), device=stored.device),
                                     value_states.new_zeros((count, *shape, value_states.shape[-1]),
                                                            device=stored.device)))
        group, index = self.where[layer]
        with torch.enable_grad():  # a view made under no_grad could not be written to with grad mode on
            return self.buffers[group][0][index], self.buffers[group][1][index]

    def rotate_into_buffers(self, n_sink: int, delta: int) -> None:
        """Write the first ``n_sink`` sinks of every layer, rotated by ``delta``, into the first slots
        of the layers' key buffers: one set of ops per device, for all layers (a ring step)."""
        for (stored, _), (keys, _) in zip(self.groups, self.buffers):
            out = keys[:, :, :, :n_sink]
            if self.rotator is not None and delta:
                self.rotator.rotate_by(stored[..., :n_sink, :], (delta,), out=out)
            else:
                out.copy_(stored[..., :n_sink, :])
        self.rotated_for = None

    def stored(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s stored sink keys (batch, kv_heads, S, head_dim), on its device."""
        group, index = self.where[layer]
        return self.groups[group][0][index]

    def store(self, layer: int, start: int, keys: torch.Tensor, delta: int) -> None:
        """Store new sink keys of ``layer`` at sink index ``start``, rotated by ``delta`` positions
        into the stored frame (the rotation runs at the stored precision)."""
        out = self.stored(layer)[:, :, start : start + keys.shape[-2]]
        if self.rotator is not None and delta:
            self.rotator.rotate_by(keys.to(out.dtype), (delta,), out=out)
        else:
            out.copy_(keys)

    def rotate_all(self, n_sink: int, delta: int) -> None:
        """Rotate the first ``n_sink`` sinks of every layer by ``delta`` positions."""
        self.rotated_for = None
        if n_sink:
            for stored, rotated in self.groups:
                if self.rotator is not None and delta:
                    self.rotator.rotate_by(stored[..., :n_sink, :], (delta,), out=rotated[..., :n_sink, :])
                else:
                    rotated[..., :n_sink, :].copy_(stored[..., :n_sink, :])
            self.rotated_for = (n_sink, delta)

    def for_layer(self, layer: int, n_sink: int, deltas: tuple[int, ...], out: torch.Tensor | None = None):
        """Layer ``layer``'s first ``n_sink`` sink keys in the model's dtype, on its device, rotated
        by each delta in turn (one group of ``n_sink`` keys per delta), written into ``out`` when given."""
        group, index = self.where[layer]
        if len(deltas) == 1 and self.rotated_for == (n_sink, deltas[0]):
            rotated = self.groups[group][1][index, :, :, :n_sink]
            return rotated if out is None else out.copy_(rotated)
        keys = self.stored(layer)[:, :, :n_sink]
        if len(deltas) > 1:
            keys = keys.repeat(1, 1, len(deltas), 1)
        if out is None:
            out = torch.empty(keys.shape, dtype=self.groups[group][1].dtype, device=keys.device)
        if self.rotator is None or deltas == (0,):
            return out.copy_(keys)
        return self.rotator.rotate_by(keys, deltas, repeats=n_sink, out=out)


def _layer_devices(model_or_config, num_layers: int) -> list[torch.device] | None:
    """The device of each decoder layer's attention (modules with a ``layer_idx``), when a model is
    given and every layer is found; None otherwise."""
    if not isinstance(model_or_config, torch.nn.Module):
        return None
    devices: dict[int, torch.device] = {}
    for module in model_or_config.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and index not in devices:
            weight = next(module.parameters(recurse=True), None)
            if weight is not None and weight.device.type != "meta":
                devices[index] = weight.device
    if sorted(devices) != list(range(num_layers)):
        return None
    return [devices[i] for i in range(num_layers)]


class SinkLayer(StaticLayer):
    """One layer's preallocated key/value buffer, driven by the cache's shared :class:`Timeline`.

    Contract (that of transformers' cache layers): :meth:`update` stores the new tokens' keys and
    values as the step planned and returns the keys/values they attend to, in cache order
    ``[sinks | window | new]``. This class keeps keys as the model gave them.

    Args:
        timeline: the bookkeeping shared by all layers.
        sinks: the cache-wide store of sink keys.
        index: this layer's index (its slice of ``sinks``).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, timeline: Timeline, sinks: SinkKeys, index: int = 0):
        super().__init__(max_cache_len=timeline.capacity)
        self.timeline, self.sinks, self.index = timeline, sinks, index
        self.sink_values: torch.Tensor | None = None  # (batch, kv_heads, S, head_dim)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate as transformers' static layers do, but hold views of the all-layer buffers of
        :class:`SinkKeys` (so a ring step writes every layer's sinks at once)."""
        super().lazy_initialization(key_states, value_states)
        if self.sinks.allocated:
            self.keys, self.values = self.sinks.layer_buffers(self.index, key_states, value_states, self.max_cache_len)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.keys)
                torch._dynamo.mark_static_address(self.values)
        S = self.timeline.sink_size
        self.sink_values = value_states.new_zeros((*value_states.shape[:2], S, value_states.shape[-1]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step, *args, **kwargs):
        """Carry out ``step``; return the keys/values the new tokens attend to, in cache order."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        K, V, s0 = self.keys, self.values, step.n_sink
        lo, hi = self._stored_window(step)
        if isinstance(step, ViewStep):
            if step.compact:  # the view reached the buffer's end: move the window to the front
                K[:, :, s0 : step.n].copy_(K[:, :, lo:hi].clone())
                V[:, :, s0 : step.n].copy_(V[:, :, lo:hi].clone())
            o = step.off
            if step.write_sinks:
                self.sinks.for_layer(self.index, s0, (step.sink_delta,), out=K[:, :, o : o + s0])
                V[:, :, o : o + s0].copy_(self.sink_values[:, :, :s0])
            K[:, :, o + step.n : o + step.n + step.q].copy_(key_states)
            V[:, :, o + step.n : o + step.n + step.q].copy_(value_states)
            keys, values = K[:, :, o : o + step.n + step.q], V[:, :, o : o + step.n + step.q]
        else:  # ConcatStep
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
                cos, sin = self.sinks.rotator.cos_sin(step.query_sink_deltas, keys.device,
                                                      compute_dtype(keys.dtype))
                attach_sink_scores(keys, SinkScores(self.sinks.stored(self.index)[:, :, :copied], cos, sin,
                                                    self.sinks.rotator))
        if not (isinstance(step, ConcatStep) and step.groups > 1):
            self._store_new_sinks(step, key_states, value_states)
        if isinstance(step, ConcatStep) and step.kept:  # evict: keep the window's tail at buffer[S:]
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
            for t in (self.keys, self.values, self.sinks.stored(self.index), self.sink_values):
                t.copy_(t.index_select(0, beam_idx.to(t.device)))
            self.sinks.rotated_for = None


class AlibiSinkLayer(SinkLayer):
    """ALiBi: the bias is computed from the key's index in the attended tensor, which is already
    its in-cache position, so nothing is rotated. The buffer has ``slack`` extra slots, so that
    eviction moves the view by one slot and the window is compacted once every ``slack`` tokens."""


class RopeSinkLayer(SinkLayer):
    """RoPE: keys carry their position in their rotation. Sinks are rotated per step (by
    :class:`SinkKeys`), the window follows a rebased position frame, and single tokens into a full
    cache use the ring layout (:class:`~streamingllm.timeline.RingStep`).

    Args:
        rotator: rotates keys by position differences.
    """

    def __init__(self, timeline: Timeline, sinks: SinkKeys, index: int, rotator: Rotator):
        super().__init__(timeline, sinks, index)
        self.rotator = rotator

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
            ring = K.narrow(2, s0, self.timeline.window_size + 1)
            self.rotator.rotate_by(ring, (step.shift,), out=ring)
        if step.write_sinks and not self.sinks.buffers:  # else written for all layers at once
            self.sinks.for_layer(self.index, s0, (step.sink_delta,), out=K.narrow(2, 0, s0))
        if step.write_sink_values:
            self.values.narrow(2, 0, s0).copy_(self.sink_values)

    def _stored_window(self, step: ViewStep | ConcatStep) -> tuple[int, int]:
        lo, hi = super()._stored_window(step)
        if step.shift and hi > lo:  # the caller moved the position frame: follow it once
            self.rotator.rotate_by(self.keys[:, :, lo:hi], (step.shift,), out=self.keys[:, :, lo:hi])
        return lo, hi


Policy = Literal["global", "sliding"]
GLOBAL: Policy = "global"
SLIDING_POLICY: Policy = "sliding"


class NativeWindowWarning(UserWarning):
    """Every layer of the model slides over its own window, which the cache keeps instead of sinks."""


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
        sinks: their stored sink keys and all-layer key/value buffers (empty sinks when ``S = 0``).
        rotator: their rotation (None for ALiBi).
        step: the step of the running forward.
        slots: per device, (1,) int64: the buffer slot of a prepared decode step's token.
    """

    policy: Policy
    layer_type: str
    layers: list[int]
    timeline: Timeline
    sinks: SinkKeys
    rotator: Rotator | None
    step: Step | None = None
    slots: dict = field(default_factory=dict)

    @property
    def full(self) -> bool:
        """The group holds as many tokens as it keeps (a single token is a ring step)."""
        t = self.timeline
        return t.ring_capable and self.sinks.allocated and t.n_sink == t.sink_size and t.window == t.window_size

    def rotate_sinks(self, step: Step) -> None:
        """Rotate the sinks of every layer of the group at once (one set of small ops per step, not
        per layer); a ring step writes them straight into every layer's buffer."""
        if isinstance(step, RingStep) and step.write_sinks and self.sinks.buffers:
            self.sinks.rotate_into_buffers(step.n_sink, step.sink_delta)
        elif isinstance(step, (ViewStep, RingStep)) and step.write_sinks:
            self.sinks.rotate_all(step.n_sink, step.sink_delta)
        else:
            self.sinks.rotated_for = None


class SinkCache(Cache):
    """StreamingLLM's attention-sink cache for transformers 5 models.

    Args:
        model_or_config: the model (preferred: its rotary frequencies are read from it) or its
            config. Decides how positions are handled; unsupported families raise
            :class:`~streamingllm.families.UnsupportedModelError`.
        sink_size: number of initial tokens kept as attention sinks (tokens, >= 0). 0 gives
            plain window attention, the paper's baseline.
        window_size: number of most recent tokens kept (tokens, >= 1).

            In a hybrid model (Gemma 2/3, gpt-oss) these size the global layers; sliding-window
            layers keep the model's own window (:func:`layer_policies`).
        slack: ALiBi families only: extra buffer slots (tokens) so eviction moves a view instead
            of copying; the window is copied back once every ``slack`` tokens. Default
            ``max(64, window_size // 4)``. RoPE families decode in a ring of exactly
            ``sink_size + window_size + 1`` slots and need none.
        rebase_every: how far (tokens) the stream's positions may run ahead of the in-cache
            positions before :meth:`position_ids` moves them back (a rebase). Default
            ``max(window_size, 256)``; keeps the positions the library's loops give the model
            below about ``2 * (sink_size + window_size) + 256``.
        fast_chunks: accept forwards of several tokens that overflow the window with the model's
            plain causal mask (a long prompt through ``model.generate``): cheaper, but a token
            then also sees up to ``q - 1`` older window tokens, with the sinks one position
            further away per such token (see docs/design.md). Default False: such a forward is
            refused with :class:`~streamingllm.timeline.ApproximateChunkError`.

    A cache larger than the model's trained length is accepted with a warning (positions past
    it were never trained). Buffers are allocated on the first forward, after checking that they
    fit in the device's available memory (:class:`CacheTooLargeError` otherwise).

    Usage: ``model(input_ids, cache=c)``, ``model.generate(..., cache=c)`` (also multi-turn:
    pass the whole conversation and the same cache; only the new tokens are fed), or the
    library's loops (:func:`~streamingllm.feed.generate_tokens`, :func:`~streamingllm.feed.generate`).
    A forward whose tokens would see more than the window under the model's causal mask (a long
    prompt in one piece) is refused unless it comes with :meth:`exact_chunk_mask` or after
    :meth:`allow_fast_chunk`; :func:`~streamingllm.feed.generate` and
    :func:`~streamingllm.feed.prefill` handle this for you.
    """

    def __init__(
        self,
        model_or_config,
        sink_size: int = 4,
        window_size: int = 1020,
        *,
        slack: int | None = None,
        rebase_every: int | None = None,
        fast_chunks: bool = False,
    ):
        check_transformers()
        sink_size, window_size = check_cache_sizes(sink_size, window_size)
        slack = max(64, window_size // 4) if slack is None else check_int("slack", slack, 0)
        rebase_every = max(window_size, 256) if rebase_every is None else check_int("rebase_every", rebase_every, 1)
        config = model_or_config.config if isinstance(model_or_config, torch.nn.Module) else model_or_config
        if config is None or not hasattr(config, "model_type"):
            raise TypeError(f"model_or_config must be a transformers model or config, got {type(model_or_config).__name__}")
        config = text_config(config)
        family = family_of(config)
        _check_fits(config, family, sink_size, window_size)
        _check_attention(config)
        if family.positions == "rope":
            check_rope_scaling(config)
        if isinstance(model_or_config, torch.nn.Module) and family.attention_interface:
            use_sink_attention(model_or_config)
        self.config = config
        self.family: Family = family
        self.sink_size, self.window_size = sink_size, window_size
        self.num_layers = config.num_hidden_layers
        #: Each layer's policy: ``"global"`` (sinks + window) or ``"sliding"`` (the model's own window).
        self.layer_policies: list[Policy] = layer_policies(config, family, sink_size, window_size)
        types = layer_types_of(config, family)
        self._devices = _layer_devices(model_or_config, self.num_layers)
        rope = family.positions == "rope"
        self.groups: list[LayerGroup] = []  # the global group first, when there is one
        for policy in (GLOBAL, SLIDING_POLICY):
            members = [i for i, p in enumerate(self.layer_policies) if p == policy]
            if not members:
                continue
            S, W = (sink_size, window_size) if policy == GLOBAL else (0, sliding_window_of(config, family) - 1)
            timeline = Timeline(sink_size=S, window_size=W, capacity=S + W + 1 + (0 if rope else slack),
                                ring_capable=rope, rotates=rope, follows_positions=family.positions_visible,
                                rebase_every=rebase_every, fast_chunks=bool(fast_chunks),
                                masks_itself=policy == SLIDING_POLICY)
            rotator = Rotator(rope_inv_freq(model_or_config, types[members[0]])) if rope else None
            devices = None if self._devices is None else [self._devices[i] for i in members]
            self.groups.append(LayerGroup(policy, types[members[0]], members, timeline, SinkKeys(rotator, devices),
                                          rotator))
        self._group_of: list[LayerGroup] = [None] * self.num_layers
        for group in self.groups:
            for i in group.layers:
                self._group_of[i] = group
        #: The primary group's timeline and sink store: the global layers' (the sliding ones' when all slide).
        self.timeline, self.sinks = self.groups[0].timeline, self.groups[0].sinks
        self._band: torch.Tensor | None = None  # this forward's exact band mask, for sink-aware attention
        self._rows: PaddedRows | None = None  # a left-padded batch: one stream per row
        self._next_layer = 0  # the layer whose update the running forward calls next
        self._prepared = False  # prepare_decode_step() did the bookkeeping of the next forward
        self._undo: tuple[list[Timeline], list[RingStep], int] | None = None  # per group: the timeline before
        # that step and the step; and its position
        self._shifted = 0  # layers whose ring that step has prepared
        self._position: torch.Tensor | None = None  # (1, 1) int64: its position id
        self._handed: tuple | None = None  # (ids, their version, first position): the ids last handed out
        #: Exact chunks through the sink-aware attention compute each query's sink logits from one
        #: zero-key copy of the sinks (False: one rotated copy of the sinks per query, the reference).
        self.sink_scores = True
        layers = []
        for i, group in enumerate(self._group_of):
            index = group.layers.index(i)
            if rope:
                layer = RopeSinkLayer(group.timeline, group.sinks, index, group.rotator)
            else:
                layer = AlibiSinkLayer(group.timeline, group.sinks, index)
            layer.is_sliding = group.policy == SLIDING_POLICY  # transformers sizes the sliding masks from these
            layers.append(layer)
        super().__init__(layers=layers)

    @property
    def _global(self) -> LayerGroup | None:
        """The group of global layers (sinks + window), if the model has any."""
        return self.groups[0] if self.groups[0].policy == GLOBAL else None

    @property
    def _local(self) -> LayerGroup | None:
        """The group of sliding layers kept at their native window, if the model has any."""
        return self.groups[-1] if self.groups[-1].policy == SLIDING_POLICY else None

    def native_window(self, layer_idx: int) -> int | None:
        """The model's own sliding window (tokens, the query included) that layer ``layer_idx`` keeps,
        or None for a global layer (sinks + window)."""
        group = self._group_of[layer_idx]
        return group.timeline.window_size + 1 if group.policy == SLIDING_POLICY else None

    # --- the transformers Cache API -------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new keys/values of layer ``layer_idx`` and return those to attend to."""
        if layer_idx == 0:
            self._begin_forward(key_states, kwargs)
        elif layer_idx != self._next_layer:
            raise RuntimeError(f"SinkCache: update() for layer {layer_idx} while layer {self._next_layer} was expected; "
                               "a forward runs every layer in order, starting at layer 0")
        self._next_layer = (layer_idx + 1) % self.num_layers
        if self._rows is not None:
            return self._rows.update(key_states, value_states, layer_idx)
        if self._prepared:  # static step: no Python-side decision, shapes never change
            layer, slots = self.layers[layer_idx], self._group_of[layer_idx].slots
            slot = slots.get(key_states.device)
            if slot is None:  # a layer on another device (device_map): its own copy of the slot index
                slot = slots[key_states.device] = next(iter(slots.values())).to(key_states.device)
            layer.keys.index_copy_(2, slot, key_states)
            layer.values.index_copy_(2, slot, value_states)
            if layer_idx == self.num_layers - 1:
                self._prepared, self._undo = False, None
            return layer.keys, layer.values
        group = self._group_of[layer_idx]
        keys, values = self.layers[layer_idx].update(key_states, value_states, group.step)
        if self._band is not None and group.policy == GLOBAL:
            if self._band.device != keys.device:
                self._band = self._band.to(keys.device)  # layers are in device order: moved once per device
            attach_band(keys, self._band)
        return keys, values

    def _begin_forward(self, key_states: torch.Tensor, kwargs: dict) -> None:
        """Layer 0 of a forward: plan it, unless prepare_decode_step() planned it already and this
        forward is the one it was prepared for."""
        if self._next_layer != 0:  # the previous forward stopped part-way (an exception)
            if not self._prepared:
                raise RuntimeError(
                    f"SinkCache: the previous forward stopped after layer {self._next_layer - 1} of "
                    f"{self.num_layers}, so the cache holds its tokens in some layers only; call reset()")
            self._rollback()
        if self._prepared:
            if key_states.shape[-2] == 1 and (torch.compiler.is_compiling() or self._position_matches(kwargs)):
                return  # the forward that was prepared
            self._rollback()  # another forward: plan it as it is
        positions = _position_ids(kwargs)
        if self._rows is None and positions is not None and _padded(positions):
            self._start_rows(key_states.shape[0])
        if self._rows is not None:
            self._rows.begin(None if positions is None else positions.expand(key_states.shape[0], -1),
                             key_states.shape[-2])
            return
        p0 = None if positions is None else self._first_position(positions)
        if not self.sinks.allocated:
            self._allocate(key_states)
        q, glob = key_states.shape[-2], self._global
        self._band = None
        if glob is not None:
            t = glob.timeline
            if (t.overflows(q) and not (t.exact_next == q or t.fast_next == q or t.fast_chunks)
                    and self.family.positions == "rope" and is_sink_attention(self.config)):
                self._band = self._global_band(q, key_states.dtype, key_states.device)  # a new turn, say
        for group in self.groups:
            group.step = group.timeline.plan(q, p0)
            if isinstance(group.step, ConcatStep) and group.step.groups > 1 and self._scores_layout():
                group.step = dataclasses.replace(group.step, sink_scores=True)
            group.rotate_sinks(group.step)

    def _scores_layout(self) -> bool:
        """Exact chunks of this cache give the sinks as one zero-key copy whose logits the
        attention computes (:class:`~streamingllm.attention.SinkScores`), not one copy per group."""
        return self.sink_scores and self.family.positions == "rope" and is_sink_attention(self.config)

    def _allocate(self, key_states: torch.Tensor) -> None:
        """Allocate the cache-wide tensors, after checking that all the buffers fit."""
        need = self.estimated_bytes(key_states)
        free = available_bytes(key_states.device)
        if free is not None and need > free:
            raise CacheTooLargeError(
                "window_size", f"is too large: sink_size + window_size = {self.sink_size + self.window_size} tokens "
                f"need {need / 2**30:.2f} GiB of {key_states.device.type} memory for the cache, but "
                f"{free / 2**30:.2f} GiB is available; lower window_size", self.window_size,
                mentions=("sink_size", "window_size"))
        moved = self._devices is not None and self._devices[0] != key_states.device
        for group in self.groups:
            if moved:
                group.sinks.layer_devices = None  # the model moved since the cache was built: follow its keys
            group.sinks.allocate(len(group.layers), key_states, group.timeline.sink_size)
            group.slots = {key_states.device: torch.zeros(1, dtype=torch.long, device=key_states.device)}
        self._position = torch.zeros((1, 1), dtype=torch.long, device=key_states.device)

    def estimated_bytes(self, key_states: torch.Tensor) -> int:
        """Bytes all layers' buffers take for keys/values shaped like ``key_states`` (B, H, T, D)."""
        batch, heads, _, dim = key_states.shape
        size = key_states.element_size()
        stored = torch.empty((), dtype=compute_dtype(key_states.dtype)).element_size()  # the stored sink keys
        total = 0
        for group in self.groups:
            t = group.timeline
            per_slot = (2 * t.capacity + 2 * t.sink_size) * size + t.sink_size * stored
            total += len(group.layers) * batch * heads * dim * per_slot
        return total

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (for memory accounting: :func:`streamingllm.memory.storage_bytes`)."""
        out = [t for group in self.groups for t in (*group.sinks.tensors(), *group.slots.values())]
        out += [self._position] if self._position is not None else []
        for layer in self.layers:
            if layer.is_initialized:
                out += [layer.keys, layer.values, layer.sink_values]
        for row in self.row_caches or ():
            out += row.tensors()
        return out

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

        The step is undone, and the forward planned as usual, when the forward that follows is not
        the one prepared (several tokens, or other position ids than the returned ones) or when an
        earlier prepared forward stopped part-way (an exception). Families whose position ids do
        not reach the cache get the position the model computes by itself (``get_seq_length()``).

        Returns None (nothing done) when the next step cannot be prepared -- the cache is not full
        yet, or the family is ALiBi: call the model without position ids then.
        """
        if self._prepared:
            self._rollback()
        if self._next_layer != 0 or self._rows is not None:
            return None  # an ordinary forward stopped part-way (the next one reports it), or a padded batch
        if not all(group.full for group in self.groups):
            return None
        before = [dataclasses.replace(group.timeline) for group in self.groups]
        p = self.timeline.next_position()
        for group in self.groups:
            group.step = group.timeline.plan(1, p)
        steps = [group.step for group in self.groups]
        self._undo, self._prepared, self._shifted = (before, steps, p), True, 0  # undone even if what follows fails
        for group in self.groups:
            group.rotate_sinks(group.step)
        for i, layer in enumerate(self.layers):
            layer.prepare_ring(self._group_of[i].step)
            self._shifted = i + 1
        for group in self.groups:
            for slot in group.slots.values():
                slot.fill_(group.step.slot)
        self._position.fill_(p)
        return self._hand_out(self._position, p)

    def _start_rows(self, batch: int) -> None:
        """A left-padded batch arrives: give each row a stream of its own (see :mod:`streamingllm.rows`)."""
        if self.timeline.seen:
            raise ValueError("SinkCache: rows with different position ids arrived in a stream that has begun; "
                             "a padded batch must start in a new cache")
        if not (self.family.positions_visible and self.family.attention_interface and is_sink_attention(self.config)):
            raise ValueError(
                f"SinkCache: this batch is left-padded (its rows have other position ids), which needs a family whose "
                f"position ids reach the cache and the sdpa or eager attention ({self.family.name} with "
                f"attn_implementation={attention_implementation(self.config)!r} cannot); feed streams of equal length")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrainedLengthWarning)  # said once already, by this cache
            warnings.simplefilter("ignore", NativeWindowWarning)
            rows = [SinkCache(self.config, self.sink_size, self.window_size, rebase_every=self.timeline.rebase_every,
                              fast_chunks=self.timeline.fast_chunks) for _ in range(batch)]
        for row in rows:  # rotate with the model's own frequencies, keep sinks on the layers' devices
            row.sink_scores = False  # the rows' bands are stacked into one mask: their sinks come as copies
            for mine, theirs in zip(self.groups, row.groups):
                theirs.rotator = theirs.sinks.rotator = mine.rotator
                theirs.sinks.layer_devices = mine.sinks.layer_devices
                for i in theirs.layers:
                    row.layers[i].rotator = mine.rotator
        self._rows = PaddedRows(rows)

    @classmethod
    def stacked(cls, caches: list[SinkCache]) -> SinkCache:
        """A cache for one forward that advances several independent streams by one token each.

        Row ``r`` of that forward is the next token of the stream ``caches[r]`` holds (each a
        batch-1 cache for the same model, with any sizes, lengths and positions): it is stored in
        and attends to that cache only, exactly as a forward of its own would, with the position
        ids ``caches[r].position_ids(1)``. Use :func:`~streamingllm.feed.decode_rows`, which builds
        the forward. Needs sink-aware attention (:attr:`can_stack`); ValueError otherwise.
        """
        if not caches:
            raise ValueError("SinkCache.stacked: give at least one cache")
        first = caches[0]
        if not all(c.can_stack and c.config is first.config for c in caches):
            raise ValueError("SinkCache.stacked: every cache must serve the same model, with sink-aware attention "
                             "(sdpa or eager; see SinkCache.can_stack), and not be a padded batch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrainedLengthWarning)  # each stream's cache said it already
            warnings.simplefilter("ignore", NativeWindowWarning)
            batch = cls(first.config, first.sink_size, first.window_size)
        batch._rows = PaddedRows(list(caches), stacked=True)
        return batch

    @property
    def can_stack(self) -> bool:
        """True when this cache's stream can share decode forwards with others (:meth:`stacked`):
        a batch-1 stream of a family whose attention goes through the sink-aware interface."""
        batch_1 = not self.layers[0].is_initialized or self.layers[0].keys.shape[0] == 1
        return (self._rows is None and batch_1 and self.family.attention_interface and is_sink_attention(self.config)
                and not self._prepared)

    def _position_matches(self, kwargs: dict) -> bool:
        """The forward gives the prepared position (or none, for families whose positions the model
        takes from ``get_seq_length()``, which is the prepared one there)."""
        positions = _position_ids(kwargs)
        return positions is None or self._first_position(positions) == self._undo[2]

    def _hand_out(self, positions: torch.Tensor, p: int) -> torch.Tensor:
        """Remember the position ids given to a caller (first one ``p``), so that when the forward
        passes them back they are recognised without reading the device (no host sync on a GPU).
        The ids are kept alive, so no other tensor can take their memory while they are remembered."""
        self._handed = (positions, positions._version, p)
        return positions

    def _first_position(self, positions: torch.Tensor) -> int:
        """The first position id of this forward: known without a device read when they are the ids
        :meth:`position_ids` or :meth:`prepare_decode_step` handed out, unmodified since."""
        h = self._handed
        if (h is not None and positions.data_ptr() == h[0].data_ptr() and positions._version == h[1]
                and positions.numel() == h[0].numel()):
            return h[2]
        return int(positions[0, 0])

    def _rollback(self) -> None:
        """Undo a prepared step whose forward did not run (or not to the end): the timeline goes
        back to before it, the ring is rotated back if the step moved the frame, and the sinks are
        rewritten at the next step. The prepared token's slot was free, so writes to it harm nothing.

        A step that moved the position frame (a rebase) is not rotated back, which would round the
        window twice in 16-bit dtypes: the ring keeps the new frame (every layer's, finishing what
        an interrupted preparation left), and the restored timeline records it."""
        before, steps, _ = self._undo
        for i in range(self._shifted, self.num_layers):
            layer, step = self.layers[i], steps[self.groups.index(self._group_of[i])]
            if step.shift:
                ring = layer.keys.narrow(2, step.n_sink, layer.timeline.window_size + 1)
                layer.rotator.rotate_by(ring, (step.shift,), out=ring)
        for group, was, step in zip(self.groups, before, steps):
            for name in Timeline.STATE:
                setattr(group.timeline, name, getattr(was, name))
            group.timeline.frame_next += step.shift
            group.timeline.sinks_in_buffer = None
            group.sinks.rotated_for = None
        self._prepared, self._undo, self._next_layer = False, None, 0

    def position_ids(self, q: int, device=None, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Position ids (1, q) for the next forward of ``q`` tokens, as the library's loops pass them.

        They follow the stream, and move back to the in-cache positions once they have run
        ``rebase_every`` tokens ahead (families whose position ids reach the cache), so the angles
        the model computes stay small however long the stream. None for ALiBi families (no
        positions). Passing none at all is exact too: the model then uses ``get_seq_length()``.

        Args:
            q: tokens in the next forward.
            device: where to put the ids (the model's input device; the CPU when None).
            out: a (1, q) int64 tensor to write them into (a decode loop reuses one), else a new one.
        """
        if self.family.positions != "rope" or self._rows is not None:
            return None
        if self._prepared and q != 1:
            self._rollback()
        p = self.timeline.next_position() if self._undo is None else self._undo[2]
        if out is not None:
            torch.arange(p, p + q, out=out.view(-1))
            return self._hand_out(out, p)
        return self._hand_out(torch.arange(p, p + q, device=device)[None], p)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens of the stream consumed so far (before a prepared step's forward runs); the
        cached tokens for families that size their ALiBi bias from it (Falcon with ALiBi). For a
        left-padded batch: the columns consumed, pads included (what ``generate()`` slices by)."""
        if self._rows is not None:
            return self._rows.columns
        t = self._settled()
        return t.length if self.family.bias_from_seq_length else t.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._rows is not None:
            raise NotImplementedError("SinkCache: beam search over a left-padded batch is not supported; "
                                      "use greedy or sampled generation, or rows of equal length")
        super().reorder_cache(beam_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """In-cache index of the first new token in layer ``layer_idx`` (the attention masks are
        built in cache order; a hybrid model's sliding layers hold other tokens than its global ones)."""
        return self.layers[layer_idx].timeline.length

    def reset(self) -> None:
        super().reset()
        for group in self.groups:
            group.timeline.reset()
            group.sinks.rotated_for = None
        self._prepared, self._undo, self._next_layer, self._rows = False, None, 0, None

    # --- streaming helpers ------------------------------------------------------------

    @property
    def seen_tokens(self) -> int:
        """Tokens of the stream processed so far (exact, unbounded); for a left-padded batch, the
        columns (pads included)."""
        return self._rows.columns if self._rows is not None else self._settled().seen

    @property
    def cached_tokens(self) -> int:
        """Tokens whose KV is held now (at most :attr:`max_cached_tokens`; in a hybrid model, by its
        global layers; for a left-padded batch, the most any row holds)."""
        return self._rows.cached_tokens if self._rows is not None else self._settled().length

    @property
    def row_caches(self) -> list | None:
        """The rows' own caches when this cache serves a left-padded batch, else None."""
        return None if self._rows is None else self._rows.rows

    def _settled(self) -> Timeline:
        """The timeline as of the last forward that ran (not counting a prepared step)."""
        return self._undo[0][0] if self._undo is not None else self.timeline

    @property
    def max_cached_tokens(self) -> int:
        """The most tokens a layer of the primary group keeps: ``sink_size + window_size`` (the
        global layers'), or ``sliding_window - 1`` when every layer keeps the model's own window."""
        return self.timeline.sink_size + self.timeline.window_size

    @property
    def exact_chunks(self) -> bool:
        """True when a chunk can be given its exact band (:meth:`exact_chunk_mask`): RoPE families
        whose attention takes additive float masks (sdpa, eager and the band-aware implementations).
        Otherwise exact feeding goes one token at a time."""
        impl = attention_implementation(self.config)
        return self.family.positions == "rope" and (impl in SINK_ATTENTION or impl in BAND_AWARE)

    def state_dict(self) -> dict:
        """Everything needed to continue this stream exactly elsewhere (``torch.save`` it): the
        timeline and every tensor the cache holds. Restore with :meth:`load_state_dict` into a
        cache built for the same model and sizes."""
        if self._rows is not None:
            raise ValueError("SinkCache.state_dict: a left-padded batch's cache cannot be saved; save each row's")
        if self._prepared:
            self._rollback()
        layers = [(layer.keys, layer.values, layer.sink_values) if layer.is_initialized else None
                  for layer in self.layers]
        sinks = [self._group_of[i].sinks.stored(layer.index) for i, layer in enumerate(self.layers)]
        return {"format": 1, "family": self.family.name, "num_layers": self.num_layers,
                "sink_size": self.sink_size, "window_size": self.window_size, "policies": list(self.layer_policies),
                "timeline": dataclasses.asdict(self.timeline), "layers": layers,
                "timelines": [dataclasses.asdict(group.timeline) for group in self.groups],
                "sinks": sinks if self.sinks.allocated else None}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream a :meth:`state_dict` saved: the next forward gives what it would
        have given in the saved cache. Tensors go to each layer's device (the model's, when the
        cache was built from a model). Raises ValueError when the state is for another cache."""
        mine = {"format": 1, "family": self.family.name, "num_layers": self.num_layers,
                "sink_size": self.sink_size, "window_size": self.window_size, "policies": list(self.layer_policies)}
        theirs = {k: state.get(k, [GLOBAL] * self.num_layers if k == "policies" else None) for k in mine}
        if theirs != mine:
            raise ValueError(f"SinkCache.load_state_dict: the state is for {theirs}, this cache is {mine}")
        self.reset()
        for group, saved in zip(self.groups, state.get("timelines", [state["timeline"]])):
            for name in (f.name for f in dataclasses.fields(Timeline)):
                setattr(group.timeline, name, saved[name])
            group.timeline.sinks_in_buffer = None  # rewrite the sinks at the next step
        if state["sinks"] is None:
            return
        devices = self._devices or [state["layers"][0][0].device] * self.num_layers
        first = state["layers"][0][0].to(devices[0])
        self._allocate(first[:, :, :1])
        for i, (layer, saved) in enumerate(zip(self.layers, state["layers"])):
            keys, values, sink_values = (t.to(devices[i]) for t in saved)
            layer.lazy_initialization(keys[:, :, :1], values[:, :, :1])
            layer.keys.copy_(keys)
            layer.values.copy_(values)
            layer.sink_values.copy_(sink_values)
            self._group_of[i].sinks.stored(layer.index).copy_(state["sinks"][i])

    def allow_fast_chunk(self, q: int) -> None:
        """Let the next forward, of ``q`` tokens, use the model's plain causal mask although it
        overflows the window (the approximation ``fast_chunks=True`` allows for every forward)."""
        if self._rows is not None:
            raise ValueError("SinkCache: a left-padded batch's rows plan their own chunks; no fast chunk to allow")
        if self._prepared:
            self._rollback()
        if self._global is not None:  # sliding layers are banded by the model's own mask
            self._global.timeline.fast_next = q

    def exact_chunk_mask(self, q: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor | None:
        """Prepare the next forward of ``q`` tokens for exact banded attention.

        Returns the additive 4D mask (1, 1, q, keys) to pass as ``attention_mask``, or None when
        the ordinary causal mask is already exact (the window does not overflow inside the
        chunk). Every token then sees exactly the sinks plus its own last ``window_size``
        tokens, at the positions it would have had if fed one by one. For a hybrid model it is a
        dict of the masks per layer type, as those models take it: ``{"full_attention": the band,
        "sliding_attention": the model's own sliding-window mask over what those layers hold}``.

        Args:
            q: tokens in the next forward.
            dtype: the mask's dtype (the model's); masked entries hold its most negative value.
            device: where to build the mask (the model's device; the CPU when None).

        The mask has ``q`` rows and ``S + window + q`` columns when the model attends through the
        sink-aware attention (the sinks' logits for each query are then added by the attention;
        :attr:`sink_scores`), else ``S * (held + q - S - W) + window + q`` (one copy of the sinks
        per overflowing position). For a prompt of many thousands of tokens in one forward it is
        large, and :func:`~streamingllm.feed.generate` (bounded chunks) is the better way.
        """
        if self._rows is not None:
            raise ValueError("SinkCache: a left-padded batch's rows give their chunks their own bands")
        if self._prepared:
            self._rollback()  # a chunk comes instead of the prepared token
        glob, local = self._global, self._local
        if glob is None or not glob.timeline.overflows(q):
            return None  # the model's own masks are exact (a sliding layer's is its band)
        if not self.exact_chunks:
            raise UnsupportedModelError(
                f"exact chunked attention is not available for {self.family.name} with attn_implementation="
                f"{attention_implementation(self.config)!r} (ALiBi, or no additive float masks): feed it token by token")
        band = self._global_band(q, dtype, device)
        if local is None:
            return band
        n, window = local.timeline.length, local.timeline.window_size + 1
        at = n + torch.arange(q, device=device)[:, None]  # each query's index among what the sliding layers hold
        held = torch.arange(n + q, device=device)[None, :]
        sliding = torch.zeros((q, n + q), dtype=dtype, device=device)
        sliding.masked_fill_(~((held <= at) & (held > at - window)), torch.finfo(dtype).min)
        return {FULL: band, SLIDING: sliding[None, None]}

    def _global_band(self, q: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The global layers' exact band (1, 1, q, keys) for the next forward of ``q`` tokens, which
        overflows their window; marks that forward as exact."""
        t = self._global.timeline
        t.exact_next = q
        S, W, w, length = t.sink_size, t.window_size, t.window, t.length
        arange = lambda *a: torch.arange(*a, device=device)  # noqa: E731
        at = length + arange(q)[:, None]  # each query's index in the stream held (sinks first)
        if self._scores_layout():  # one zero-key copy: each query's sink logits come from the attention
            sink_ok = arange(S)[None, :] <= at  # a sink sees the sinks up to itself
        else:  # one copy per group: how far the query's own window has overflowed
            group = (at - S - W).clamp(min=0)
            copies = arange((length + q - S - W) * S)[None, :]
            sink_ok = (copies // max(S, 1) == group) & (copies % max(S, 1) <= at)
        # then the stored window and the new tokens, by stream index; sinks among them are seen through the copies
        held = torch.cat((arange(t.n_sink, t.n_sink + w), arange(length, length + q)))[None, :]
        recent_ok = (held >= S) & (held <= at) & (held >= at - W)
        allowed = torch.cat((sink_ok, recent_ok), dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]


def _position_ids(kwargs: dict) -> torch.Tensor | None:
    """The position ids (rows, q) of this forward, if the model passed them to the cache."""
    inner = kwargs.get("kwargs", kwargs)
    pos = inner.get("position_ids") if isinstance(inner, dict) else None
    if pos is None:
        return None
    return pos.reshape(-1, pos.shape[-1]) if pos.dim() > 1 else pos[None]


def _padded(positions: torch.Tensor) -> bool:
    """True when the rows' position ids differ, or are not consecutive (left padding)."""
    if positions.shape[0] > 1 and bool((positions != positions[:1]).any()):
        return True
    q = positions.shape[-1]
    return q > 1 and bool((positions[:, -1] - positions[:, 0] != q - 1).any())


def _check_attention(config) -> None:
    """Refuse attention implementations that cannot honour the cache's additive masks."""
    impl = getattr(config, "_attn_implementation", None) or ""
    if impl.startswith(("flash", "paged", "kernels-community")) or "flash" in impl:
        raise UnsupportedModelError(
            f"attn_implementation={impl!r}: flash-attention kernels take 2D padding masks only, so they cannot attend "
            "to the sinks at shifted positions inside a chunk (exact prefill) and are not tested with this cache; "
            "load the model with attn_implementation='sdpa' (or 'eager')")


def check_cache_sizes(sink_size, window_size) -> tuple[int, int]:
    """``(sink_size, window_size)`` checked as token counts (>= 0 and >= 1), before any model is at hand."""
    return check_int("sink_size", sink_size, 0), check_int("window_size", window_size, 1)


def _check_fits(config, family: Family, sink_size: int, window_size: int) -> None:
    """Refuse cache sizes the model's own masking or bias tables would silently break, and warn
    about a cache longer than the model's trained length, or sinks no layer keeps."""
    total = sink_size + window_size
    if sink_size and GLOBAL not in layer_policies(config, family, sink_size, window_size):
        sliding = sliding_window_of(config, family)
        warnings.warn(
            f"every layer of this {family.name} model slides over its own window of {sliding} tokens, and "
            f"sink_size + window_size = {total} does not fit inside it: the cache keeps that window in every layer "
            f"(as the model was trained), and no attention sinks, since the model's mask would hide them; "
            f"for a smaller cache with sinks, use sink_size + window_size < {sliding}",
            NativeWindowWarning, stacklevel=3)
    limit = alibi_limit(config, family)
    if limit is not None and total + 1 > limit:
        raise ArgumentError(
            "window_size", f"must be <= {limit - sink_size - 1} for {family.name}: sink_size + window_size + 1 "
            f"must fit its ALiBi table ({family.alibi_table_attr}={limit})", window_size,
            mentions=("sink_size", "window_size"))
    trained = past_trained_length(config, total)
    if trained is not None:
        warnings.warn(
            f"sink_size + window_size = {total} reaches the model's trained length ({trained} tokens): the next "
            f"token sits at position {total}, past the trained ones, so quality may collapse as with dense attention",
            TrainedLengthWarning,
            stacklevel=3,
        )
