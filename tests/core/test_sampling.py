"""Choosing tokens: penalties on recent tokens, a minimum reply length, stop strings; the token
chooser and the reply text that generation, sessions and the server share."""

from __future__ import annotations

import pytest
import torch

from streamingllm import Sampling, SinkCache, generate_tokens, prefill
from streamingllm.checks import ArgumentError
from streamingllm.sampling import TokenChooser
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
