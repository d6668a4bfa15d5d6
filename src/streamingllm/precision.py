"""Low-precision weights for CPU decoding, through torch's own int8 kernel.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth: the
default model's 135M float32 weights are 540 MB a token. ``quantize="int8"`` reads a quarter of
that: every ``nn.Linear`` whose input width is a multiple of 16 becomes an :class:`Int8Linear`,
int8 weights with one scale per output row (symmetric, absmax), multiplied by torch's int8-weight
kernel (``torch._weight_int8pack_mm``) in the activations' dtype. Best with ``dtype="bfloat16"``
(the kernel's float32 path is slow) and compiled (:mod:`streamingllm.compiled`), where inductor's
C++ GEMM template takes the kernel's place. The cache, the attention and the embeddings keep the
model's dtype. Exactness is stated against the layer's own reference: its
:meth:`Int8Linear.dequantized` weights through ``F.linear``.

Not offered, with the reason measured in docs/results.md: torch's dynamic int8 quantization
(activations quantized per call too) is the fastest eager path, but raised the default model's
perplexity by 42% (by 5% even with ``down_proj`` and the output head left in float32).
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import ArgumentError, check_choice

#: The accepted values of ``quantize``.
QUANTIZE = ("none", "int8")
#: The int8 kernel needs input widths that are a multiple of this (others stay in the model's dtype).
INT8_ALIGN = 16


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as int8, one scale per output row.

    Args:
        weight: (out_features, in_features) float weights to quantize; ``in_features`` must be a
            multiple of :data:`INT8_ALIGN`.
        bias: (out_features,) or None, kept in the activations' dtype.
        dtype: the activations' dtype (the scales are stored in it, as the kernel wants).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        if weight.shape[1] % INT8_ALIGN:
            raise ValueError(f"Int8Linear: in_features ({weight.shape[1]}) must be a multiple of {INT8_ALIGN}")
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> Int8Linear:
        """The int8 twin of ``linear`` (activations in ``dtype``, default the linear's)."""
        return cls(linear.weight, linear.bias, dtype or linear.weight.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weights this layer multiplies by, as float32 (out_features, in_features): the reference."""
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def check_quantize(quantize: str, device: torch.device | str | None = None) -> str:
    """``quantize`` checked against :data:`QUANTIZE` and, when given, the model's device (before
    anything is loaded); raises :class:`~streamingllm.checks.ArgumentError` naming it."""
    quantize = check_choice("quantize", quantize, list(QUANTIZE))
    kind = None if device is None else torch.device(device).type
    if quantize != "none" and kind not in (None, "cpu"):
        raise ArgumentError("quantize", f"runs on the CPU only (torch's int8 CPU kernels), not on {kind}; "
                            "use quantize='none' there", quantize, mentions=("device",))
    return quantize


def quantize_model(model: nn.Module, quantize: str = "none") -> nn.Module:
    """Quantize ``model``'s linear layers in place (see the module's docstring) and return it.

    Args:
        model: a causal LM on the CPU, in eval mode.
        quantize: one of :data:`QUANTIZE`; ``"none"`` returns the model unchanged.
    """
    quantize = check_quantize(quantize, next(model.parameters()).device)
    if quantize == "none":
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % INT8_ALIGN == 0:
                setattr(parent, name, Int8Linear.from_linear(child))
    return model

