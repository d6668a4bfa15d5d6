"""Low-precision weights (streamingllm.precision) against their slow reference: the same model with
every quantized linear replaced by F.linear over its dequantized weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import ReferenceSinkCache
from streamingllm import SinkCache, load
from streamingllm.checks import ArgumentError
from streamingllm.feed import prefill
from streamingllm.precision import INT8_ALIGN, Int8Linear, check_quantize, quantize_model
from tiny import VOCAB, tiny_model

#: Tolerances of the int8 path against its dequantized reference, per activation dtype, in logits
#: (the tiny models' are ~2): float32 agrees to rounding (1e-6 measured); bfloat16 rounds the
#: kernel's outputs and every activation (0.012 measured). The float model is 0.026-0.031 away.
TOL = {torch.float32: 1e-4, torch.bfloat16: 0.02}


class DequantizedLinear(nn.Module):
    """The reference: ``F.linear`` over the int8 layer's dequantized weights, in float32."""

    def __init__(self, layer: Int8Linear):
        super().__init__()
        self.weight, self.bias = layer.dequantized(), None if layer.bias is None else layer.bias.float()

    def forward(self, x):
        return F.linear(x.float(), self.weight, self.bias).to(x.dtype)


def _dequantized_twin(model):
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear):
                setattr(parent, name, DequantizedLinear(child))
    return twin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_int8_linear_equals_its_dequantized_weights(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).to(dtype)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, 64, dtype=dtype)
    want = F.linear(x.float(), layer.dequantized(), layer.bias.float())
    got = layer(x)
    assert got.dtype == dtype and got.shape == (3, 5, 48)
    assert (got.float() - want).abs().max().item() <= TOL[dtype] * max(1.0, want.abs().max().item() / 10)
    # the dequantized weights are the float ones to within half a quantization step per row (plus,
    # in bf16, the rounding of the row's scale to bf16, which the kernel takes: 2^-8 of the row's largest)
    rowmax = linear.weight.float().abs().amax(dim=1, keepdim=True)
    scale_rounding = 2**-8 if dtype == torch.bfloat16 else 1e-6
    assert ((layer.dequantized() - linear.weight.float()).abs() <= rowmax / 127 / 2 + rowmax * scale_rounding).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_quantized_model_streams_like_its_dequantized_twin(dtype):
    """A tiny Llama quantized to int8 streams through an evicting SinkCache (exact chunks, then
    decoding) as its dequantized twin does through the slow reference cache."""
    model = quantize_model(tiny_model("llama", dtype=dtype), "int8")
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 7 + 1  # q k v o gate up down, lm_head
    twin = _dequantized_twin(model)
    ids = torch.randint(0, VOCAB, (1, 150), generator=torch.Generator().manual_seed(3))
    fast = prefill(model, SinkCache(model, 4, 28), ids, chunk_size=32, return_all_logits=True).float()
    assert (fast - _reference_logits(twin, ids)).abs().max().item() <= TOL[dtype]
    plain = _reference_logits(tiny_model("llama", dtype=dtype), ids)  # negative control: not the float model
    assert (fast - plain).abs().max().item() > TOL[dtype]


def _reference_logits(model, ids):
    """Every token's logits, fed one by one through the slow reference cache (4 + 28)."""
    cache = ReferenceSinkCache(model, 4, 28)
    with torch.no_grad():
        return torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], 1).float()


def test_layers_whose_width_the_kernel_cannot_take_stay_in_float():
    model = nn.Sequential(nn.Linear(INT8_ALIGN * 2, 8), nn.Linear(8, 4))  # 8 is not a multiple of 16
    quantize_model(model.eval(), "int8")
    assert isinstance(model[0], Int8Linear) and type(model[1]) is nn.Linear
    with pytest.raises(ValueError, match="in_features \\(8\\) must be a multiple of 16"):
        Int8Linear.from_linear(nn.Linear(8, 4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="int4"), "quantize must be one of none, int8, got 'int4'"),
    (dict(quantize="int8-dynamic"), "quantize must be one of none, int8, got 'int8-dynamic'"),
    (dict(quantize="int8", device="cuda"), "quantize runs on the CPU only"),
])
def test_bad_quantize_values_name_the_parameter(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        check_quantize(**kwargs)


def test_load_quantizes_before_returning():
    model, _ = load(random_weights=True, quantize="int8", dtype="bfloat16")
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    with pytest.raises(ArgumentError, match="quantize must be one of"):
        load(random_weights=True, quantize="fp4")
