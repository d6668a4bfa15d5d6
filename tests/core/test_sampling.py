"""Choosing tokens: penalties on recent tokens, a minimum reply length, stop strings; the token
chooser and the reply text that generation, sessions and the server share."""

from __future__ import annotations

import pytest
import torch

from streamingllm import Sampling, SinkCache, generate_tokens, prefill
from streamingllm.checks import ArgumentError
from streamingllm.sampling import TokenChooser, model_sampling
from streamingllm.session import StopStrings
from streamingllm.text import ReplyText
from tiny import VOCAB, tiny_model


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    recent = torch.tensor([[0, 1, 1]])  # token 0 once, token 1 twice
    rep = Sampling(repetition_penalty=2.0).penalize(logits, recent)
    assert rep.tolist() == [[1.0, -2.0, 3.0, 0.5]]  # positive divided, negative multiplied, others unchanged
    pres = Sampling(presence_penalty=0.5).penalize(logits, recent)
    assert pres.tolist() == [[1.5, -1.5, 3.0, 0.5]]
    freq = Sampling(frequency_penalty=0.25).penalize(logits, recent)
    assert freq.tolist() == [[1.75, -1.5, 3.0, 0.5]]
    assert Sampling(presence_penalty=0.5, penalty_last_n=0).penalize(logits, recent).tolist() == logits.tolist()


@pytest.mark.parametrize("kwargs, param", [(dict(repetition_penalty=0), "repetition_penalty"),
                                           (dict(presence_penalty=2.5), "presence_penalty"),
                                           (dict(frequency_penalty=-3), "frequency_penalty"),
                                           (dict(penalty_last_n=-1), "penalty_last_n")])
def test_bad_penalties_name_the_parameter(kwargs, param):
    with pytest.raises(ArgumentError, match=param):
        Sampling(**kwargs)


def test_penalized_greedy_decoding_equals_a_hand_written_loop():
    """The library's penalised greedy tokens against a loop that applies the penalties by hand,
    over the last 8 tokens of prompt and reply; and they differ from unpenalised decoding."""
    model = tiny_model("llama")
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(20))
    sampling = Sampling(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2, penalty_last_n=8)
    got = [int(t[0]) for t in generate_tokens(model, SinkCache(model, 4, 20), prompt, 40, sampling)]
    plain = [int(t[0]) for t in generate_tokens(model, SinkCache(model, 4, 20), prompt, 40)]
    cache, history, expected = SinkCache(model, 4, 20), prompt[0].tolist(), []
    logits = prefill(model, cache, prompt)[0]
    with torch.no_grad():
        for _ in range(40):
            scores = logits.clone()
            last = history[-8:]
            for token in set(last):
                s = scores[token]
                s = s / 1.5 if s > 0 else s * 1.5
                scores[token] = s - 0.3 - 0.2 * last.count(token)
            expected.append(int(scores.argmax()))
            history.append(expected[-1])
            logits = model(torch.tensor([[expected[-1]]]), cache=cache).logits[0, -1]
    assert got == expected and got != plain


def test_min_new_tokens_suppresses_the_stop_tokens():
    model = tiny_model("llama")
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(21))
    first = int(next(generate_tokens(model, SinkCache(model, 4, 20), prompt, 1))[0])
    stops = frozenset({first})
    ended = [int(t[0]) for t in generate_tokens(model, SinkCache(model, 4, 20), prompt, 10, stop_token_ids=stops)]
    assert ended == [first]  # without a minimum, the reply ends at once
    longer = [int(t[0]) for t in generate_tokens(model, SinkCache(model, 4, 20), prompt, 10, stop_token_ids=stops,
                                                 min_new_tokens=5)]
    assert len(longer) >= 6 and first not in longer[:5]


def test_stop_strings_hold_back_what_may_start_one():
    stops = StopStrings(("</s>", "STOP"))
    shown = [stops.add(p) for p in ["Hello ", "wor", "ld ST", "O", "P and more"]]
    assert shown == ["Hello ", "wor", "ld ", "", ""] and stops.stopped  # "ST" held back, then the stop found
    loose = StopStrings(("</s>",))
    assert "".join(loose.add(p) for p in ["a<", "/", "x"]) + loose.flush() == "a</x"  # a false start is shown


def test_the_chooser_remembers_the_last_n_tokens_and_suppresses_stops_for_min_new_tokens():
    logits = torch.zeros(1, 5)
    logits[0, 4] = 10.0  # token 4, a stop token, wins whenever it is allowed
    choose = TokenChooser(Sampling(presence_penalty=0.1, penalty_last_n=3), torch.tensor([1, 2, 3, 0]), "cpu",
                          stop_token_ids={4}, min_new_tokens=2)
    assert choose.recent.tolist() == [[2, 3, 0]]  # the prompt's last 3
    got = [int(choose(logits)[0]) for _ in range(3)]
    assert got == [1, 2, 4]  # the unpenalised token, then the one that left the memory, then the stop
    assert choose.recent.tolist() == [[1, 2, 4]] and choose.chosen == 3
    assert choose.is_stop(torch.tensor([4, 1])).tolist() == [True, False]
    plain = TokenChooser(Sampling(), torch.tensor([1]), "cpu")
    assert plain.recent is None and plain.generator is None  # nothing kept without penalties or a seed


def test_seeded_choosers_repeat_each_other():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    sampling = Sampling(temperature=1.5, top_k=40, top_p=0.9, seed=9, frequency_penalty=0.5)
    runs = [[int(c(logits)[0]) for _ in range(20)] for c in (TokenChooser(sampling, [1, 2], "cpu") for _ in range(2))]
    other = TokenChooser(Sampling(temperature=1.5, top_k=40, top_p=0.9, seed=10, frequency_penalty=0.5), [1, 2], "cpu")
    assert runs[0] == runs[1] != [int(other(logits)[0]) for _ in range(20)]


def test_min_p_keeps_the_tokens_at_least_min_p_times_as_likely_as_the_most_likely():
    """min_p's definition, on the temperature-scaled distribution: p(token) >= min_p * max p."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = probs.log().expand(4000, 4)
    picked = Sampling(temperature=1.0, min_p=0.2).pick(rows, torch.Generator().manual_seed(0))
    counts = torch.bincount(picked, minlength=4).float() / len(picked)
    assert counts[3] == 0  # 0.05 < 0.2 * 0.5: dropped
    assert counts[:3].tolist() == pytest.approx((probs[:3] / probs[:3].sum()).tolist(), abs=0.03)  # the rest renormalised
    assert torch.bincount(Sampling(temperature=1.0).pick(rows, torch.Generator().manual_seed(0)), minlength=4)[3] > 0
    two = torch.tensor([[0.0, -2.0]]).expand(2000, 2)  # p1 / p0 = e^-2 = 0.14 at temperature 1, e^-1 = 0.37 at 2
    assert Sampling(temperature=1.0, min_p=0.2).pick(two, torch.Generator().manual_seed(1)).max() == 0
    assert Sampling(temperature=2.0, min_p=0.2).pick(two, torch.Generator().manual_seed(1)).max() == 1
    chooser = TokenChooser(Sampling(temperature=1.0, min_p=0.2, seed=3), [0], "cpu")  # the chooser applies it too
    assert chooser(rows[:500]).max() < 3
    with pytest.raises(ArgumentError, match="min_p must be a number >= 0 and <= 1"):
        Sampling(min_p=1.5)


def test_a_models_generation_config_gives_its_recommended_sampling():
    class Config:  # a transformers GenerationConfig: to_diff_dict() holds what the model's file sets
        def __init__(self, **own):
            self.own = own

        def to_diff_dict(self):
            return {"bos_token_id": 1, "_from_model_config": True, **self.own}

    assert model_sampling(Config()) is None and model_sampling(None) is None  # nothing recommended
    qwen = model_sampling(Config(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05), 32)
    assert qwen == Sampling(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, penalty_last_n=32)
    assert model_sampling(Config(top_p=0.9)) == Sampling(temperature=1.0, top_p=0.9)  # the rest off, temperature 1
    assert model_sampling(Config(do_sample=False, temperature=0.6)).temperature == 0.0  # greedy


def test_seeds_are_what_a_torch_generator_takes():
    for seed in (-(2**63), 2**64 - 1):
        TokenChooser(Sampling(temperature=1.0, seed=seed), [0], "cpu")
    with pytest.raises(ArgumentError, match="seed must be an integer"):
        Sampling(seed=2**64)


class Pieces:
    """A tokenizer whose token i decodes to PIECES[i]."""

    PIECES = ["Hello", " wor", "ld", " ST", "OP", " more"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def test_reply_text_shows_tokens_up_to_a_stop_string():
    reply = ReplyText(Pieces(), stop=["STOP"])
    assert [reply.add(i) for i in range(5)] == ["Hello", " wor", "ld", " ", ""]  # "ST" held back, then the stop
    assert reply.stopped and reply.text == "Hello world " and reply.flush() == ""
    assert reply.token_ids == [0, 1, 2, 3, 4]  # what the model wrote, stop string included
    held = ReplyText(Pieces(), stop=["STOPPED"])
    assert [held.add(i) for i in (0, 3, 4)] == ["Hello", " ", ""] and not held.stopped
    assert held.flush() == "STOP" and held.text == "Hello STOP"  # a false start is shown when the reply ends
