"""What is trained: the four variants, the model and schedule sizes, and building a variant's model.

The variants differ in one thing each (paper Sec. 3.3, and gpt-oss):

==============  =====================================================================================
``vanilla``      a plain Llama; samples start anywhere in the text
``sink-token``   the same Llama, with a dedicated ``<sink>`` token prepended to every sample (and
                 kept as the only sink when streaming: S = 1)
``softmax1``     SoftMax1, the paper's "zero sink": one fixed zero logit in every softmax row
``sink-logit``   gpt-oss's learned sink: one learned logit per head in every softmax row
==============  =====================================================================================

Every variant starts from the same weights (the vanilla model's initialisation for the seed, the
sink logits at zero) and sees the same windows of the same text with the same tokenizer and
schedule, and its loss is taken on the same tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..checks import ArgumentError, check_choice, check_float, check_int
from ..evals.corpus import AUSTEN_NOVELS
from ..models import DTYPES, resolve_device


@dataclass(frozen=True)
class Variant:
    """One pre-training variant.

    Attributes:
        name: the name ``--variants`` takes.
        description: one line for the help.
        sink_token: True when ``<sink>`` is prepended to every sample (and every text when streaming).
        attention_sink: the softmax sink of :class:`~streamingllm.sink_llama.SinkLlamaConfig`
            (``"zero"`` or ``"learned"``), or None for a plain softmax.
    """

    name: str
    description: str
    sink_token: bool = False
    attention_sink: str | None = None


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("vanilla", "plain softmax, samples start anywhere"),
    Variant("sink-token", "a learnable <sink> token prepended to every sample (streamed with S = 1)", sink_token=True),
    Variant("softmax1", "SoftMax1 (zero sink): a fixed zero logit in every softmax", attention_sink="zero"),
    Variant("sink-logit", "gpt-oss style: a learned sink logit per head", attention_sink="learned"),
)}


@dataclass(frozen=True)
class TrainConfig:
    """Model and schedule of one pre-training run (the same for every variant).

    Attributes:
        vocab_size: BPE vocabulary entries, special tokens included.
        hidden_size: model width.
        intermediate_size: MLP width.
        num_layers: decoder layers.
        num_heads: attention heads (query heads; ``hidden_size`` must divide by it).
        num_kv_heads: key/value heads (``num_heads`` must divide by it).
        seq_len: tokens of text per training sample: the trained length (the sink-token variant
            sees one more, its ``<sink>``).
        batch_size: samples per optimiser step.
        steps: optimiser steps; tokens seen = ``steps * batch_size * seq_len``.
        learning_rate: peak learning rate of AdamW (linear warm-up, cosine decay).
        warmup_steps: steps of linear warm-up.
        min_lr_ratio: the final learning rate as a fraction of the peak.
        weight_decay: AdamW weight decay on matrices (not on norms or sink logits).
        grad_clip: maximum gradient norm.
        seed: seeds the initial weights and the order of the samples.
        held_out: the Austen novel kept out of training, for validation and evaluation.
        eval_every: steps between validation losses.
        eval_windows: held-out samples in the validation loss.
        dtype: ``"float32"``, or ``"bfloat16"`` (autocast; weights and optimiser stay float32).
        device: where to train (``"cpu"``, ``"cuda"``, ...); checked when training starts.
    """

    vocab_size: int = 8192
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 6
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1000
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    held_out: str = "persuasion"
    eval_every: int = 100
    eval_windows: int = 16
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "batch_size", "steps", "eval_every", "eval_windows"):
            check_int(name, getattr(self, name), 1)
        check_int("seq_len", self.seq_len, 2)
        check_int("vocab_size", self.vocab_size, 300)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0)
        check_float("learning_rate", self.learning_rate, 0.0, open_min=True)
        check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("grad_clip", self.grad_clip, 0.0, open_min=True)
        if self.hidden_size % self.num_heads:
            raise ArgumentError("num_heads", f"must divide hidden_size ({self.hidden_size})", self.num_heads,
                                mentions=("hidden_size",))
        if self.num_heads % self.num_kv_heads:
            raise ArgumentError("num_kv_heads", f"must divide num_heads ({self.num_heads})", self.num_kv_heads,
                                mentions=("num_heads",))
        if (self.hidden_size // self.num_heads) % 2:
            raise ArgumentError("num_heads", f"must leave an even head size for RoPE (hidden_size "
                                f"{self.hidden_size} / num_heads {self.num_heads} is odd)", self.num_heads)
        check_choice("held_out", self.held_out, AUSTEN_NOVELS)
        check_choice("dtype", self.dtype, ("float32", "bfloat16"))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (None values are ignored), checked again."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


#: Named configurations. ``cpu`` (the default) trains each variant in about 20 minutes on the
#: 2-core CPU (4.1M tokens, about 4.7 passes over the 0.87M training tokens, a 4.2M-parameter
#: model); ``gpu`` trains a 29M-parameter model on 1024-token samples in bfloat16, for the same
#: number of passes (the Austen text, not the compute, bounds it); ``tiny`` is for tests.
PRESETS: dict[str, TrainConfig] = {
    "cpu": TrainConfig(),
    "gpu": TrainConfig(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=8,
                       seq_len=1024, batch_size=16, steps=250, learning_rate=1e-3, warmup_steps=25,
                       eval_every=25, dtype="bfloat16", device="cuda"),
    "tiny": TrainConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, seq_len=32, batch_size=4, steps=4, warmup_steps=1, eval_every=2,
                        eval_windows=2),
}


def variants_of(names) -> list[Variant]:
    """The :class:`Variant` rows of ``names`` (in the order given), checked."""
    if isinstance(names, str):
        names = [names]
    names = list(names or [])
    if not names:
        raise ArgumentError("variants", f"give at least one of {', '.join(VARIANTS)}", names)
    for name in names:
        check_choice("variants", name, tuple(VARIANTS))
    return [VARIANTS[n] for n in dict.fromkeys(names)]


def model_config(variant: Variant, config: TrainConfig, tokenizer):
    """The transformers config of ``variant``: a ``LlamaConfig``, or a ``SinkLlamaConfig`` with its
    softmax sink. ``max_position_embeddings`` is the trained length (``seq_len``, one more for the
    sink token)."""
    from transformers import LlamaConfig

    from ..sink_llama import SinkLlamaConfig
    from .data import EOS, SINK

    eos = tokenizer.convert_tokens_to_ids(EOS)
    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.seq_len + variant.sink_token,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(SINK) if variant.sink_token else eos,
        eos_token_id=eos, pad_token_id=eos)
    if variant.attention_sink:
        return SinkLlamaConfig(attention_sink=variant.attention_sink, **kwargs)
    return LlamaConfig(**kwargs)


def build_model(variant: Variant, config: TrainConfig, tokenizer) -> torch.nn.Module:
    """``variant``'s model, float32 on ``config.device``, initialised exactly like the vanilla model
    of the same seed (sink logits at zero)."""
    from transformers import AutoModelForCausalLM

    vanilla = model_config(VARIANTS["vanilla"], config, tokenizer)
    torch.manual_seed(config.seed)
    init = AutoModelForCausalLM.from_config(vanilla, dtype=torch.float32)
    mine = model_config(variant, config, tokenizer)
    if type(mine) is type(vanilla):
        model = init
        model.config.max_position_embeddings = mine.max_position_embeddings
        model.config.bos_token_id = mine.bos_token_id
    else:
        model = AutoModelForCausalLM.from_config(mine, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(init.state_dict(), strict=False)
        if unexpected or any(not k.endswith("sinks") for k in missing):
            raise RuntimeError(f"initial weights do not carry over: missing {missing}, unexpected {unexpected}")
    return model.to(resolve_device(config.device))


def autocast_dtype(config: TrainConfig) -> torch.dtype | None:
    """The autocast dtype of ``config.dtype`` (None for float32)."""
    return None if config.dtype == "float32" else DTYPES[config.dtype]
