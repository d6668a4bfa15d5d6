"""Tiny random models of every family, built from transformers config classes (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

from streamingllm.sink_llama import SinkLlamaConfig

VOCAB = 97
SLIDING_WINDOW = 12  # the hybrid models' own window (tokens, the query included)
_HYBRID = dict(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"])

_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(num_key_value_heads=2),
    "mistral": lambda: tf.MistralConfig(num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2),
    "qwen3": lambda: tf.Qwen3Config(num_key_value_heads=2, head_dim=8),
    "gemma": lambda: tf.GemmaConfig(num_key_value_heads=1, head_dim=8),
    "phi3": lambda: tf.Phi3Config(num_key_value_heads=2, sliding_window=None, pad_token_id=0),
    "gpt_neox": lambda: tf.GPTNeoXConfig(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "sink_llama-zero": lambda: SinkLlamaConfig(attention_sink="zero", num_key_value_heads=2),
    "sink_llama-learned": lambda: SinkLlamaConfig(attention_sink="learned", num_key_value_heads=2),
    "falcon": lambda: tf.FalconConfig(alibi=False, new_decoder_architecture=True, num_kv_heads=2),
    "falcon-alibi": lambda: tf.FalconConfig(alibi=True),
    "mpt": lambda: tf.MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=4096, expansion_ratio=2),
    "bloom": lambda: tf.BloomConfig(n_head=4, n_layer=2),
    # hybrid local/global models: 3 layers, sliding - global - sliding, a 12-token window
    "gemma2": lambda: tf.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=SLIDING_WINDOW, **_HYBRID),
    "gemma3": lambda: tf.Gemma3TextConfig(
        num_key_value_heads=2, head_dim=8, sliding_window=SLIDING_WINDOW, **_HYBRID,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    "gpt_oss": lambda: tf.GptOssConfig(num_key_value_heads=2, head_dim=8, sliding_window=SLIDING_WINDOW, num_local_experts=4,
                                       num_experts_per_tok=2, attn_implementation="eager", **_HYBRID),
    "mistral-sliding": lambda: tf.MistralConfig(num_key_value_heads=2, sliding_window=SLIDING_WINDOW),
    # Qwen2 with use_sliding_window: global first, then sliding (layers from max_window_layers on)
    "qwen2-sliding": lambda: tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                                            num_hidden_layers=3, max_window_layers=1),
}

ROPE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox", "falcon", "sink_llama-zero",
                 "sink_llama-learned"]
ALIBI_FAMILIES = ["falcon-alibi", "mpt", "bloom"]
FAMILIES = ROPE_FAMILIES + ALIBI_FAMILIES
#: Models with sliding-window layers (all of them, for Mistral's): their own windows, beside sinks
HYBRID_FAMILIES = ["gemma2", "gemma3", "gpt_oss", "mistral-sliding", "qwen2-sliding"]


def tiny_config(family: str, **overrides):
    config = _CONFIGS[family]()
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1 << 20, tie_word_embeddings=False,
    )
    if family in HYBRID_FAMILIES and family != "mistral-sliding":
        common.pop("num_hidden_layers")  # three, with their layer_types (set when the config is built)
    for key, value in {**common, **overrides}.items():
        if family == "mpt" and key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings"):
            continue
        setattr(config, key, value)
    return config


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A 2-layer random model of ``family`` in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # random init is tiny; scale weights up so attention is far from uniform and errors show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name:
                p.mul_(4.0)
            if name.endswith("sinks"):  # learned softmax sinks: far from their zero initialisation
                p.normal_(0.0, 2.0)
    return model


def chat_tokenizer():
    """A character-level chat tokenizer for the tiny models: one token per character, one per
    role, ``<|end|>`` ends a turn (so short turns, and a small window holds a few)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    roles = ("system", "user", "assistant")
    special = ["<unk>", "<|end|>"] + [f"<|{r}|>" for r in roles]
    vocab = {t: i for i, t in enumerate(special + list("\n" + string.printable[:95]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|end|>",
                                     additional_special_tokens=special[2:])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok
