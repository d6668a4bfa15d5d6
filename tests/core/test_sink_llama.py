"""The softmax-sink Llama (SoftMax1 and learned sink logits) against a hand-written forward, as an
ordinary transformers model (Auto classes, save and reload), and streamed through a SinkCache.

Its exactness against the slow reference over long streams, chunks and multi-turn generate() is
in the family-parametrized tests (``sink_llama-zero`` and ``sink_llama-learned`` in tiny.py)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

from streamingllm import SinkCache
from streamingllm.checks import ArgumentError
from streamingllm.evals.attention import capture, sink_statistics
from streamingllm.sink_llama import SINK_LOGIT_ATTENTION, SinkLlamaConfig, SinkLlamaForCausalLM

from reference import ReferenceSinkCache
from tiny import VOCAB, tiny_model

TOL = 1e-4  # float32 model against the float64 hand-written forward, on logits of size ~10


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def hand_forward(model, ids: torch.Tensor, sink: str | None) -> torch.Tensor:
    """Llama written out in float64, with the softmax sink spelt as its formula:
    p_j = exp(s_j) / (exp(b) + sum_k exp(s_k)), b = 0 (zero), b_h (learned) or no b (None)."""
    c = model.config
    W = {k: v.detach().double() for k, v in model.state_dict().items()}
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    theta = c.rope_parameters["rope_theta"]
    x = W["model.embed_tokens.weight"][ids[0]]
    T = x.shape[0]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = _rms(x, W[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = (h @ W[p + "self_attn.q_proj.weight"].T).view(T, -1, d).transpose(0, 1)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).view(T, -1, d).transpose(0, 1)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).view(T, -1, d).transpose(0, 1)
        q, k = _rope(q, theta), _rope(k, theta)
        group = q.shape[0] // k.shape[0]
        out = torch.zeros_like(q)
        for head in range(q.shape[0]):
            kh, vh = k[head // group], v[head // group]
            b = {None: -math.inf, "zero": 0.0}.get(sink, None)
            if b is None:
                b = float(W[p + "self_attn.sinks"][head])
            for t in range(T):
                e = torch.exp((q[head, t] @ kh[: t + 1].T) / math.sqrt(d))
                out[head, t] = (e / (math.exp(b) + e.sum())) @ vh[: t + 1]
        x = x + out.transpose(0, 1).reshape(T, -1) @ W[p + "self_attn.o_proj.weight"].T
        h = _rms(x, W[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate = h @ W[p + "mlp.gate_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * (h @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    x = _rms(x, W["model.norm.weight"], c.rms_norm_eps)
    return x @ W["lm_head.weight"].T


@pytest.mark.parametrize("family, sink", [("llama", None), ("sink_llama-zero", "zero"),
                                          ("sink_llama-learned", "learned")])
def test_forward_equals_the_hand_written_formula(family, sink):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits[0].double()
    want = hand_forward(model, ids, sink)
    assert (got - want).abs().max().item() <= TOL
    if sink is not None:  # negative control: the same weights without the sink are another model
        assert (hand_forward(model, ids, None) - want).abs().max().item() > 100 * TOL


def test_learned_sinks_are_parameters_and_zero_sinks_are_not():
    learned, zero = tiny_model("sink_llama-learned"), tiny_model("sink_llama-zero")
    assert sum(n.endswith("sinks") for n, _ in learned.named_parameters()) == learned.config.num_hidden_layers
    assert not any(n.endswith("sinks") for n, _ in zero.named_parameters())
    assert not any(k.endswith("sinks") for k in zero.state_dict())  # nothing to save: it is the constant 0


@pytest.mark.parametrize("family", ["sink_llama-zero", "sink_llama-learned"])
def test_saved_and_reloaded_through_the_auto_classes_gives_identical_logits(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is SinkLlamaForCausalLM and again.config._attn_implementation == SINK_LOGIT_ATTENTION
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("impl", ["sdpa", "eager", None])
def test_every_ordinary_implementation_name_means_the_sink_attention(impl, tmp_path):
    tiny_model("sink_llama-learned").save_pretrained(tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl)
    assert model.config._attn_implementation == SINK_LOGIT_ATTENTION
    model.set_attn_implementation("eager")  # what the attention capture asks of other models
    assert model.config._attn_implementation == SINK_LOGIT_ATTENTION


def test_an_attention_without_the_sink_is_refused(tmp_path):
    tiny_model("sink_llama-zero").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'.*sink logit"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flex_attention")


def test_bad_attention_sink_names_the_parameter():
    with pytest.raises(ArgumentError, match="attention_sink must be one of zero, learned, got 'one'"):
        SinkLlamaConfig(attention_sink="one")


@pytest.mark.parametrize("family", ["sink_llama-zero", "sink_llama-learned"])
def test_chunked_prefill_and_decode_equal_the_reference(family):
    """Chunks that overflow the window go through the sink attention with their band."""
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(3))
    fast, ref = SinkCache(model, 4, 28), ReferenceSinkCache(model, 4, 28)
    with torch.no_grad():
        a = torch.cat([model(ids[:, i:i + 50], cache=fast).logits for i in range(0, 200, 50)], dim=1)
        b = torch.cat([model(ids[:, t:t + 1], cache=ref).logits for t in range(200)], dim=1)
    assert (a - b).abs().max().item() <= 1e-4


def test_attention_statistics_see_the_softmax_sink():
    """The capture keeps the model's own attention (eager would drop the sink), and the rows' missing
    mass is what the sink took."""
    model = tiny_model("sink_llama-learned")
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(4))
    attentions = capture(model, ids)
    assert model.config._attn_implementation == SINK_LOGIT_ATTENTION
    stats = sink_statistics(attentions, k=2)
    assert (stats.softmax_sink_share > 0.05).all()
    plain = sink_statistics(capture(tiny_model("llama"), ids), k=2)
    assert (plain.softmax_sink_share < 1e-5).all()
