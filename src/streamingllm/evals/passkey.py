"""Passkey retrieval: a number hidden at some depth of a long filler stream, then asked for.

The honest limit of a bounded cache: StreamingLLM keeps the sinks and the last ``W`` tokens, so a
passkey is retrievable while it is among them when the question comes, and gone once evicted;
dense attention keeps everything (until it runs past what the model was trained on, or out of
memory). Each trial builds ``total_tokens`` of filler with the key sentence at ``depth`` (0 = the
start, 1 = right before the question), feeds it to a reader (:mod:`.readers`), asks, and checks
the first number of the greedy answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..checks import ArgumentError, check_int
from .perplexity import Setting
from .readers import Reader, TokenBudgetExceeded

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    """One trial's tokens: ``context`` (filler with the key sentence at ``key_at``), then ``question``."""

    context: list[int]
    question: list[int]
    key: str
    key_at: int

    @property
    def key_distance(self) -> int:
        """Tokens from the key sentence's first token to the question's last, both included: the
        key is in a window of W recent tokens when the question ends iff this is <= W."""
        return len(self.context) - self.key_at + len(self.question)


def passkey_prompt(encode: Callable[[str], list[int]], total_tokens: int, depth: float, key: str,
                   start: Sequence[int] = ()) -> PasskeyPrompt:
    """The trial with ``key`` at ``depth`` (0..1) of a stream of about ``total_tokens`` tokens.

    Args:
        encode: text -> token ids (no special tokens).
        total_tokens: context + question length (tokens, >= the key sentence and question).
        depth: where the key sentence starts, as a fraction of the filler (0 first, 1 last).
        key: the passkey (digits).
        start: token ids the stream begins with (the tokenizer's ``<bos>`` where it adds one:
            Gemma reads text after it), counted in ``total_tokens``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ArgumentError("depths", "must be fractions in [0, 1]", depth)
    key_ids, question, filler = encode(KEY_SENTENCE.format(key=key)), encode(QUESTION), encode(FILLER)
    room = total_tokens - len(key_ids) - len(question) - len(start)
    if room < 0:
        raise ArgumentError("total_tokens", f"must be at least {len(key_ids) + len(question)} (the key and the question)",
                            total_tokens)
    fill = (filler * (room // len(filler) + 1))[:room]
    at = round(depth * room)
    return PasskeyPrompt(list(start) + fill[:at] + key_ids + fill[at:], question, key, len(start) + at)


def answered(text: str, key: str) -> bool:
    """The answer's first number is the key."""
    found = re.search(r"\d+", text)
    return found is not None and found.group() == key


@dataclass(frozen=True)
class PasskeyResult:
    """One trial: ``label`` (method and cache), ``cache_size`` (tokens, None for dense), ``depth``,
    ``key_distance`` (tokens), ``in_window`` (the key was in the cache's view when asked),
    ``correct``, ``answer`` (the generated text), ``view``; ``correct`` is None when the reader
    could not read this far (dense past its budget)."""

    label: str
    cache_size: int | None
    depth: float
    key_distance: int
    in_window: bool
    correct: bool | None
    answer: str
    view: int | None = None  # recent tokens the method sees (W; L for window and recompute; None for dense)


def in_view(setting: Setting, key_distance: int) -> bool:
    """Whether a reader with ``setting`` still sees the whole key sentence when the question ends:
    dense always; window, streaming (besides its sinks) and recompute see the last ``window_size``."""
    return setting.method == "dense" or key_distance <= setting.window_size


def run_passkey(
    make_reader: Callable[[Setting], Reader],
    settings: Sequence[Setting],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    total_tokens: int,
    depths: Sequence[float],
    trials: int = 3,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    start: Sequence[int] = (),
) -> list[PasskeyResult]:
    """Every setting x depth x trial (a new reader each), keys drawn from ``seed``.

    Args:
        make_reader: ``setting -> Reader`` (a model's, or an oracle).
        settings: methods and caches, e.g. from :func:`~streamingllm.evals.perplexity.make_settings`.
        encode, decode: the tokenizer's text <-> ids (no special tokens).
        total_tokens: each trial's stream length (tokens).
        depths: where the key sits (fractions in [0, 1]).
        trials: keys per depth (>= 1).
        progress: called with 1 after each trial.
        start: token ids every stream begins with (see :func:`passkey_prompt`).
    """
    trials = check_int("trials", trials, 1)
    if not depths:
        raise ArgumentError("depths", "must list at least one depth in [0, 1]", list(depths))
    rng = random.Random(seed)
    keys = [[str(rng.randint(10000, 99999)) for _ in range(trials)] for _ in depths]
    prompts = [[passkey_prompt(encode, total_tokens, d, k, start) for k in ks] for d, ks in zip(depths, keys)]
    out = []
    for setting in settings:
        for depth, row in zip(depths, prompts):
            for p in row:
                reader = make_reader(setting)
                try:
                    reader.feed(p.context)
                    text = decode(reader.answer(p.question, 8, lambda ids: _number_done(decode(ids))))
                    correct: bool | None = answered(text, p.key)
                except TokenBudgetExceeded:
                    text, correct = "", None
                out.append(PasskeyResult(setting.label, setting.cache_size, depth, p.key_distance,
                                         in_view(setting, p.key_distance), correct, text, setting.window_size))
                if progress:
                    progress(1)
    return out


def _number_done(text: str) -> bool:
    """A number was written and something else followed it."""
    return re.search(r"\d+\D", text) is not None
