"""Where a group of layers keeps its tensors: the stored sink keys, and the key/value buffers.

Both are laid out per device (one device unless the model is split with ``device_map``): the layers
on one device share one tensor with a leading layer dimension, so that a step rotates or writes the
sinks of all of them with one set of ops, not one per layer.

* :class:`SinkStore` -- each layer's sink keys in the frame of the stream's first token, in at least
  float32 (bf16/fp16 sinks are rotated from a float32 copy and rounded once, so their error does not
  grow with the stream), and this step's rotation of them in the model's dtype.
* :class:`LayerBuffers` -- each layer's preallocated key/value buffer; the layers hold views of it.
"""

from __future__ import annotations

import torch

from ..rotation import Rotator, compute_dtype


class DeviceLayout:
    """Which device each layer of a group sits on, and its index among that device's layers.

    Args:
        devices: the device of each layer of the group, in order.
    """

    def __init__(self, devices: list[torch.device]):
        self.devices = list(dict.fromkeys(devices))  # each device once, in layer order
        self.counts = [devices.count(d) for d in self.devices]
        #: Per layer: (index of its device in :attr:`devices`, its index among that device's layers).
        self.where = [(self.devices.index(d), devices[:i].count(d)) for i, d in enumerate(devices)]


def layer_devices(model_or_config, num_layers: int) -> list[torch.device] | None:
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


class SinkStore:
    """The stored sink keys of a group's layers, one (layers, batch, kv_heads, S, head_dim) tensor
    per device, and a second tensor per device that :meth:`rotate_all` writes this step's rotation
    into (the model's dtype), which the layers copy from.

    Args:
        rotator: rotates keys by position differences (None for ALiBi: nothing is rotated).
        layer_devices: the device of each layer of the group, where known (None: all on the device
            of the first keys the cache sees).
    """

    def __init__(self, rotator: Rotator | None, layer_devices: list[torch.device] | None = None):
        self.rotator = rotator
        self.layer_devices = layer_devices
        self.layout: DeviceLayout | None = None
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (stored, rotated) per device
        self.rotated_for: tuple[int, int] | None = None  # (n_sink, delta) that the rotated tensors hold

    @property
    def allocated(self) -> bool:
        return bool(self.groups)

    def allocate(self, num_layers: int, key_states: torch.Tensor, sink_size: int) -> None:
        """Allocate (zeros) for ``num_layers`` layers of keys shaped like ``key_states`` (B, H, T, D)."""
        self.layout = DeviceLayout(self.layer_devices or [key_states.device] * num_layers)
        self.groups = []
        for device, count in zip(self.layout.devices, self.layout.counts):
            shape = (count, *key_states.shape[:2], sink_size, key_states.shape[-1])
            stored = torch.zeros(shape, dtype=compute_dtype(key_states.dtype), device=device)
            self.groups.append((stored, torch.empty(shape, dtype=key_states.dtype, device=device)))
        self.rotated_for = None

    def tensors(self) -> list[torch.Tensor]:
        """The stored and rotated sink keys."""
        return [t for group in self.groups for t in group]

    def stored(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s stored sink keys (batch, kv_heads, S, head_dim), on its device."""
        group, index = self.layout.where[layer]
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
                self._rotate(stored[..., :n_sink, :], delta, rotated[..., :n_sink, :])
            self.rotated_for = (n_sink, delta)

    def rotate_into(self, buffers: LayerBuffers, n_sink: int, delta: int) -> None:
        """Write the first ``n_sink`` sinks of every layer, rotated by ``delta``, into the first slots
        of the layers' key buffers: one set of ops per device, for all layers (a ring step)."""
        for (stored, _), keys in zip(self.groups, buffers.keys):
            self._rotate(stored[..., :n_sink, :], delta, keys[:, :, :, :n_sink])
        self.rotated_for = None

    def _rotate(self, keys: torch.Tensor, delta: int, out: torch.Tensor) -> None:
        if self.rotator is not None and delta:
            self.rotator.rotate_by(keys, (delta,), out=out)
        else:
            out.copy_(keys)

    def for_layer(self, layer: int, n_sink: int, deltas: tuple[int, ...], out: torch.Tensor | None = None):
        """Layer ``layer``'s first ``n_sink`` sink keys in the model's dtype, on its device, rotated
        by each delta in turn (one group of ``n_sink`` keys per delta), written into ``out`` when given."""
        group, index = self.layout.where[layer]
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

    def reorder(self, layer: int, beam_idx: torch.Tensor) -> None:
        """Reorder layer ``layer``'s batch rows (beam search)."""
        t = self.stored(layer)
        t.copy_(t.index_select(0, beam_idx.to(t.device)))
        self.rotated_for = None


#: The former name of :class:`SinkStore`.
SinkKeys = SinkStore


class LayerBuffers:
    """The key/value buffers of a group's layers: one (layers, batch, kv_heads, slots, head_dim)
    tensor each for keys and values per device, allocated (zeros) at the first :meth:`views` call.
    Each layer attends to views of them; a ring step writes every layer's sinks through them at once.

    Args:
        layout: the devices of the group's layers (the sink store's, once allocated).
    """

    def __init__(self, layout: DeviceLayout):
        self.layout = layout
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def views(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, slots: int):
        """Views (batch, kv_heads, slots, head_dim) of layer ``layer``'s keys and values, allocating the
        buffers at the first call, shaped like the given states."""
        if not self.keys:
            for device, count in zip(self.layout.devices, self.layout.counts):
                shape = (count, *key_states.shape[:2], slots)
                self.keys.append(key_states.new_zeros((*shape, key_states.shape[-1]), device=device))
                self.values.append(value_states.new_zeros((*shape, value_states.shape[-1]), device=device))
        group, index = self.layout.where[layer]
        with torch.enable_grad():  # a view made under no_grad could not be written to with grad mode on
            return self.keys[group][index], self.values[group][index]
