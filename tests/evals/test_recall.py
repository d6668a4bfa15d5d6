"""Attention capture and sink statistics, StreamEval and passkey: checked by hand computation,
by constructed models, and by oracle readers that see exactly what each method's cache holds."""

from __future__ import annotations

import re

import pytest
import torch

from streamingllm.checks import ArgumentError
from streamingllm.evals.attention import capture, head_mean, sink_statistics
from streamingllm.evals.passkey import passkey_prompt, run_passkey
from streamingllm.evals.perplexity import Setting, make_settings
from streamingllm.cache import BlockMemory
from streamingllm.evals.readers import make_reader
from streamingllm.evals.streameval import make_stream, run_streameval
from tiny import FAMILIES, VOCAB, tiny_model


def encode(text: str) -> list[int]:  # a character tokenizer: one token per character
    return [ord(c) for c in text]


def decode(ids) -> str:
    return "".join(chr(i) for i in ids)


class Oracle:
    """Sees exactly the tokens a method's cache holds; answers by reading them (or wrongly)."""

    def __init__(self, setting: Setting, wrong: bool = False):
        self.setting, self.wrong, self.ids, self.tokens = setting, wrong, [], 0

    def feed(self, ids):
        self.ids += list(ids)
        self.tokens += len(ids)

    def _visible(self) -> str:
        s = self.setting
        if s.method == "dense":
            return decode(self.ids)
        if s.method == "streaming":
            return decode(self.ids[: s.sink_size] + self.ids[max(s.sink_size, len(self.ids) - s.window_size) :])
        return decode(self.ids[-s.window_size :])

    def answer(self, question, max_new_tokens, stop):
        self.feed(question)
        seen = self._visible()
        line = re.search(r"in line (\d+)\?", seen[-200:])
        found = (re.search(rf"line {line.group(1)}: REGISTER_CONTENT is <(\d+)>", seen) if line
                 else re.search(r"The pass key is (\d+)\.", seen))
        out = encode("0>" if self.wrong or found is None else found.group(1) + ">")
        self.feed(out)
        return out


# --- attention -----------------------------------------------------------------------------------


def test_capture_equals_softmax_of_q_k_by_hand():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    attentions = capture(model, ids)
    layer = model.model.layers[0].self_attn
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        T, hd, nh, nkv = 12, layer.head_dim, model.config.num_attention_heads, model.config.num_key_value_heads
        q = layer.q_proj(x).view(1, T, nh, hd).transpose(1, 2)
        k = layer.k_proj(x).view(1, T, nkv, hd).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
        rot = lambda t: torch.cat((-t[..., hd // 2 :], t[..., : hd // 2]), -1)  # noqa: E731
        q, k = q * cos[:, None] + rot(q) * sin[:, None], k * cos[:, None] + rot(k) * sin[:, None]
        k = k.repeat_interleave(nh // nkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / hd**0.5
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        expected = scores.softmax(-1)[0]
    assert (attentions[0] - expected).abs().max().item() < 1e-5
    assert torch.allclose(attentions[1].sum(-1), torch.ones(nh, T), atol=1e-5)
    assert head_mean(attentions).shape == (2, T, T)


def _all_attention_to_token_0():
    """One layer whose every query puts all its attention on token 0: only token 0's embedding
    feeds a (large) key, every token's embedding a (large) query, in a RoPE pair that barely turns."""
    model = tiny_model("llama", num_hidden_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 1e12})
    attn, hd = model.model.layers[0].self_attn, model.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 1] = 1.0  # every token: component 1
        model.model.embed_tokens.weight[0, 0] = 1.0  # token 0 also: component 0
        model.model.embed_tokens.weight[0, 1] = 0.0
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        slow = hd // 2 - 1  # the pair (slow, slow + hd/2) turns by ~1e-9 rad per position
        for h in range(model.config.num_attention_heads):
            attn.q_proj.weight[h * hd + slow, :2] = 30.0
        for h in range(model.config.num_key_value_heads):
            attn.k_proj.weight[h * hd + slow, 0] = 30.0
    return model


def test_the_sink_share_is_one_when_every_query_attends_to_token_0():
    model = _all_attention_to_token_0()
    ids = torch.cat([torch.tensor([0]), torch.randint(1, VOCAB, (30,))])
    stats = sink_statistics(capture(model, ids), k=1, label="constructed")
    assert stats.sink_share[0] == pytest.approx(1.0, abs=1e-4)
    assert stats.first_share[0] == pytest.approx(1.0, abs=1e-4)
    assert stats.uniform_first < 0.2  # what uniform attention would give token 0
    plain = sink_statistics(capture(tiny_model("llama"), ids), k=1)
    assert plain.sink_share.max() < 0.9


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_works_for_every_family_and_restores_the_attention(family):
    model = tiny_model(family)
    before = model.config._attn_implementation
    attentions = capture(model, torch.randint(1, VOCAB, (20,)))
    assert len(attentions) == 2 and attentions[0].shape[-2:] == (20, 20)
    sums = attentions[0].sum(-1)
    if family.startswith("sink_llama"):  # the softmax's own sink takes the rest of each row
        assert torch.all((sums > 0) & (sums < 1 - 1e-3))
    else:
        assert torch.allclose(sums, torch.ones(attentions[0].shape[:2]), atol=1e-4)
    assert torch.all(attentions[0].triu(1) == 0)
    assert model.config._attn_implementation == before


def test_bad_attention_input_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least 2"):
        capture(model, [5])
    with pytest.raises(ArgumentError, match="k must be"):
        sink_statistics(capture(model, [1, 2, 3]), k=3)


# --- StreamEval ----------------------------------------------------------------------------------

SETTINGS = make_settings(["dense", "window", "recompute", "streaming"], [4], cache_size=[1000])


def test_streameval_oracle_scores_everything_it_sees_and_a_wrong_one_nothing():
    values, queries = make_stream(120, 10, [20], seed=1)
    assert [q.after_line for q in queries] == list(range(20, 121, 10)) and all(q.distance == 20 for q in queries)
    right = run_streameval(lambda s: Oracle(s), SETTINGS, encode, decode, values, queries)
    assert all(r.correct for r in right)  # 20 lines (~750 characters) back: in every cache of 1000
    wrong = run_streameval(lambda s: Oracle(s, wrong=True), SETTINGS, encode, decode, values, queries)
    assert not any(r.correct for r in wrong)


def test_streameval_distance_beyond_the_window_is_lost_except_for_dense():
    values, queries = make_stream(200, 10, [5, 60], seed=2)
    results = run_streameval(lambda s: Oracle(s), SETTINGS, encode, decode, values, queries)
    for r in results:
        near = r.query.distance == 5
        assert r.correct == (near or r.label == "dense"), (r.label, r.query)


def test_streameval_bad_input_names_the_parameter():
    with pytest.raises(ArgumentError, match="distances must be at most"):
        make_stream(30, 10, [40])
    with pytest.raises(ArgumentError, match="lines"):
        make_stream(0)
    with pytest.raises(ArgumentError, match="query_every"):
        make_stream(30, 0)
    with pytest.raises(ArgumentError, match="methods"):
        make_settings(["dense", "magic"], [4], cache_size=[64])


# --- passkey -------------------------------------------------------------------------------------


def test_passkey_oracle_retrieves_inside_the_window_and_never_past_it():
    settings = make_settings(["window", "streaming", "recompute", "dense"], [4], cache_size=[400])
    depths = [0.0, 0.3, 0.6, 0.8, 0.9, 1.0]
    results = run_passkey(lambda s: Oracle(s), settings, encode, decode, 2000, depths, trials=2)
    assert len(results) == len(settings) * len(depths) * 2
    for r in results:
        assert r.correct == r.in_window, r  # 100% inside the window, 0% past it
    assert {r.in_window for r in results if r.label != "dense"} == {True, False}
    from streamingllm.evals.recall_report import window_depth

    for label in {r.label for r in results} - {"dense"}:
        mine = [r for r in results if r.label == label]
        edge = window_depth(mine)  # where the plot draws the window's edge
        assert all(r.in_window == (r.depth >= edge) for r in mine), (label, edge)
    p = passkey_prompt(encode, 2000, 0.5, "12345")
    assert len(p.context) + len(p.question) == 2000 and "12345" in decode(p.context[p.key_at :])
    b = passkey_prompt(encode, 2000, 0.5, "12345", start=[7])  # a <bos> first: counted, and the key follows it
    assert b.context[0] == 7 and len(b.context) + len(b.question) == 2000 and abs(b.key_distance - p.key_distance) <= 1
    assert decode(b.context[b.key_at :]).startswith(decode(p.context[p.key_at :])[:20])
    with pytest.raises(ArgumentError, match="depths"):
        passkey_prompt(encode, 2000, 1.5, "1")
    with pytest.raises(ArgumentError, match="total_tokens"):
        passkey_prompt(encode, 10, 0.5, "1")


def test_model_readers_run_every_method_on_a_tiny_model():
    """The real readers (exact chunks, dense budget, recompute) run the harness end to end."""
    model = tiny_model("llama", vocab_size=256)
    settings = make_settings(["dense", "window", "recompute", "streaming", "memory"], [4], cache_size=[64],
                             memory=BlockMemory(block_size=16, top_k=2, repr_keys=2, chunk_size=16))
    values, queries = make_stream(30, 10, [10], seed=3)
    results = run_streameval(lambda s: make_reader(model, s, chunk_size=16, max_dense_tokens=500), settings, encode,
                             decode, values, queries)
    assert [r.label for r in results] == [s.label for s in settings for _ in queries]
    dense = [r for r in results if r.label == "dense"]
    assert dense[0].correct is not None and dense[-1].correct is None  # dense stopped at its 500-token budget
    assert all(r.correct is not None for r in results if r.label != "dense")


def test_answers_are_read_as_the_value_they_give():
    from streamingllm.evals.streameval import answer_value

    assert answer_value("51494>") == 51494  # plain mode: the question ends with "<"
    assert answer_value("The line 5 is <63468>") == 63468  # chat mode: the value, not the line number
    assert answer_value("It is 777.") == 777 and answer_value("I don't know.") is None


class TinyTemplate:
    """A chat template: ``<s>`` once, ``[u]...[/u]`` user turns, ``[a]...[/a]`` assistant turns."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        tags = {"user": "u", "assistant": "a", "system": "s"}
        text = "<s>" + "".join(f"[{tags[m['role']]}]{m['content']}[/{tags[m['role']]}]" for m in messages)
        return text + ("[a]" if add_generation_prompt else "")


def test_streameval_chat_mode_feeds_each_turn_once_as_the_template_writes_it():
    values, queries = make_stream(40, 10, [10], seed=4)
    fed = []

    class Recording(Oracle):
        def feed(self, ids):
            fed.extend(ids)
            super().feed(ids)

    results = run_streameval(lambda s: Recording(s), SETTINGS[:1], encode, decode, values, queries,
                             tokenizer=TinyTemplate())
    assert all(r.correct for r in results)
    text = decode(fed)
    assert text.startswith("<s>[u]line 0: REGISTER_CONTENT is <") and text.count("<s>") == 1
    assert text.count("[u]") == text.count("[/u]") == len(queries) and text.count("[/a]") == len(queries)


def test_sink_statistics_of_a_hybrid_model_are_told_per_layer_type(tmp_path):
    """Gemma 3: the layer types travel with the statistics into the table and the CSV; a sliding
    layer's captured rows see only its own window (12 tokens here), a global layer's every token."""
    from streamingllm.evals.attention import layer_types
    from streamingllm.evals.recall_report import sink_table, write_sink_csv

    model = tiny_model("gemma3")
    attentions = capture(model, torch.randint(1, VOCAB, (30,)))
    assert torch.all(attentions[0][:, 20, :9] == 0) and torch.all(attentions[1][:, 20, :9] > 0)
    types = layer_types(model)
    assert types == ("sliding_attention", "full_attention", "sliding_attention") and layer_types(tiny_model("llama")) is None
    stats = sink_statistics(attentions, k=2, label="gemma3", layer_types=types)
    by_type = stats.by_type()
    assert by_type["sliding_attention"]["layers"] == 2 and by_type["full_attention"]["layers"] == 1
    assert by_type["full_attention"]["first_share"] == pytest.approx(stats.first_share[1])
    table = sink_table([stats])
    assert "sliding layers" in table and "full layers" in table and "(mean of 2)" in table
    rows = write_sink_csv([stats], tmp_path / "sinks.csv").read_text().splitlines()
    assert rows[0].endswith(",layer_type") and rows[2].endswith(",full_attention")
