"""StreamEval, the paper's question answering on a stream (Xiao et al., 2024, Figures 8-9).

The stream is lines ``line <n>: REGISTER_CONTENT is <v>``, each with a random value. After every
``query_every`` lines a question asks for the value of the line ``distance`` lines back (20 in
the paper); the reader answers in the stream (its answer becomes part of it) and is scored by
exact match of the value. A method answers correctly while that line is still in what it sees:
the sinks plus the last ``W`` tokens for StreamingLLM, the last ``L`` for window attention and
re-computation, everything for dense attention (until it runs past the trained length or out of
memory). ``chat=True`` wraps each block of lines and its question as a user turn of the chat
template, and the answer as the assistant's, for instruct models.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..checks import ArgumentError, check_int, check_int_list
from ..session import template_delta, turn_end
from .perplexity import Setting
from .readers import Reader, TokenBudgetExceeded

LINE = "line {n}: REGISTER_CONTENT is <{value}>\n"
QUESTION = "Question: what is the REGISTER_CONTENT in line {n}?\nAnswer: line {n}: REGISTER_CONTENT is <"
CHAT_QUESTION = "What is the REGISTER_CONTENT in line {n}? Answer with the number only, as <number>."


@dataclass(frozen=True)
class Query:
    """One question: after ``after_line`` lines, the value of line ``line`` (``distance`` back)."""

    after_line: int
    line: int
    distance: int
    value: int


def make_stream(lines: int, query_every: int = 10, distances: Sequence[int] = (20,), seed: int = 0
                ) -> tuple[list[int], list[Query]]:
    """The values of ``lines`` lines and the questions asked among them.

    After every ``query_every`` lines, one question asks for the line ``d`` back, ``d`` taken in
    turn from ``distances`` among those that reach a line of the stream (the first questions come
    once the stream is long enough). ArgumentError for zero lines, a distance no line can reach,
    or a non-positive period.
    """
    lines = check_int("lines", lines, 1)
    query_every = check_int("query_every", query_every, 1)
    distances = check_int_list("distances", list(distances), 1, unique=False)
    if not distances:
        raise ArgumentError("distances", "must list at least one distance (lines back)", distances)
    too_far = [d for d in distances if d > lines]
    if too_far:
        raise ArgumentError("distances", f"must be at most the stream's {lines} lines (a question {too_far[0]} lines "
                            "back needs that many lines before it)", too_far[0])
    rng = random.Random(seed)
    values = [rng.randint(1000, 99999) for _ in range(lines)]
    queries, turn = [], 0
    for after in range(query_every, lines + 1, query_every):
        ok = [d for d in distances if d <= after]
        if not ok:
            continue
        d = ok[turn % len(ok)]
        turn += 1
        queries.append(Query(after, after - d, d, values[after - d]))
    if not queries:
        raise ArgumentError("lines", f"is too short for a question: {lines} lines, questions every {query_every} "
                            f"lines about the line {min(distances)} back", lines)
    return values, queries


def answer_value(text: str) -> int | None:
    """The value an answer gives: the number in its first ``<...>`` (``12345>`` in plain mode, whose
    question ends with the ``<``), else its last number, else None."""
    found = re.search(r"<\s*(\d+)", text) or re.match(r"\s*(\d+)", text)
    if found is None:
        numbers = re.findall(r"\d+", text)
        return int(numbers[-1]) if numbers else None
    return int(found.group(1))


@dataclass(frozen=True)
class StreamEvalResult:
    """One answered question: ``label`` (method and cache), ``cache_size`` (tokens, None for
    dense), the :class:`Query`, ``position`` (tokens of the stream read when it was answered),
    ``correct`` (None once dense could not read this far) and ``answer`` (the generated text)."""

    label: str
    cache_size: int | None
    query: Query
    position: int
    correct: bool | None
    answer: str


class _ChatTurns:
    """Token text of the chat template's turns, one block at a time (what each turn adds to the stream)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.last: list[dict] = []

    def user(self, text: str) -> str:
        return template_delta(self.tokenizer, self.last, [{"role": "user", "content": text}], whole=not self.last)

    def close(self, user_text: str, answer: str) -> str:
        turn = [{"role": "user", "content": user_text}]
        self.last = turn + [{"role": "assistant", "content": answer}]
        return turn_end(self.tokenizer, turn, answer)


def run_streameval(
    make_reader: Callable[[Setting], Reader],
    settings: Sequence[Setting],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    values: Sequence[int],
    queries: Sequence[Query],
    tokenizer=None,
    query_every: int = 10,
    progress: Callable[[int], None] | None = None,
) -> list[StreamEvalResult]:
    """Stream the lines through a reader per setting, asking ``queries`` as they come.

    Args:
        make_reader: ``setting -> Reader``.
        settings: methods and caches.
        encode, decode: text <-> token ids (no special tokens).
        values, queries: from :func:`make_stream`.
        tokenizer: with a chat template: chat mode (each block of lines and its question a user
            turn, the answer the assistant's); None: plain text with ``Question: ... Answer:``.
        query_every: lines between questions (as given to :func:`make_stream`).
        progress: called with 1 after each answered question.
    """
    out = []
    asked = {q.after_line: q for q in queries}
    for setting in settings:
        reader = make_reader(setting)
        chat = _ChatTurns(tokenizer) if tokenizer is not None else None
        block: list[str] = []
        stopped = False
        for n, value in enumerate(values, start=1):
            block.append(LINE.format(n=n - 1, value=value))
            q = asked.get(n)
            if q is None and n != len(values):
                continue
            text = "".join(block)
            block = []
            try:
                if q is None:
                    if chat is None:
                        reader.feed(encode(text))
                    continue
                if stopped:
                    raise TokenBudgetExceeded("stopped")
                if chat is None:
                    reader.feed(encode(text))
                    question = encode(QUESTION.format(n=q.line))
                else:
                    user = text + CHAT_QUESTION.format(n=q.line)
                    question = encode(chat.user(user))
                ids = reader.answer(question, 16, lambda ids: re.search(r"[>\n]", decode(ids)) is not None)
                position = reader.tokens
                answer = decode(ids)
                if chat is not None:
                    reader.feed(encode(chat.close(user, answer)))
                correct: bool | None = answer_value(answer) == q.value
            except TokenBudgetExceeded:
                stopped, position, correct, answer = True, reader.tokens, None, ""
            out.append(StreamEvalResult(setting.label, setting.cache_size, q, position, correct, answer))
            if progress:
                progress(1)
    return out
