"""Turn-aligned eviction: a session evicting whole exchanges never holds part of a message, checked
against the chat template's rendering of the transcript, with and without a memory of blocks."""

from __future__ import annotations

import pytest
import torch

from streamingllm import BlockMemory, Session
from streamingllm.checks import ArgumentError
from tiny import chat_tokenizer, tiny_model

SYSTEM = "Be brief."
QUESTIONS = ["Hi there, who are you?", "What is two plus two?", "Name a colour.", "And a fruit?",
             "Tell me a short story.", "Why?", "Thanks, and the capital of France?", "Bye for now."]


@pytest.fixture(scope="module")
def chat():
    tokenizer = chat_tokenizer()
    return tiny_model("llama", vocab_size=len(tokenizer)), tokenizer


def _recording(model):
    fed: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: fed.extend(kwargs["input_ids"][0].tolist()),
                                             with_kwargs=True)
    return fed, handle


def _session(chat, **kw) -> Session:
    model, tokenizer = chat
    return Session(model, tokenizer, 4, 96, system=SYSTEM, max_new_tokens=12, chunk_size=8, compile=False,
                   pin_system=True, **kw)


def test_without_a_memory_the_cache_is_the_rendering_of_whole_kept_exchanges(chat):
    model, tokenizer = chat
    session = _session(chat, evict="turns")
    fed, handle = _recording(model)
    evicting = 0
    try:
        for question in QUESTIONS:
            start = len(fed)
            "".join(session.reply(question))
            cache = session.cache
            assert cache.seen_tokens <= cache.max_cached_tokens  # never evicted by tokens
            if cache.seen_tokens == len(fed) - start:  # this turn rebuilt the cache from the kept exchanges
                evicting += 1
                since = fed[start:]
            else:
                since = fed[len(fed) - cache.seen_tokens :]
            text = tokenizer.decode(since)
            kept_from = next(i for i in range(1, len(session.messages))
                             if tokenizer.apply_chat_template(session.messages[:1] + session.messages[i:],
                                                              tokenize=False) == text)
            assert session.messages[kept_from]["role"] == "user"  # whole exchanges, from a user message on
    finally:
        handle.remove()
    assert evicting >= 3 and len(session.messages) == 1 + 2 * len(QUESTIONS)


def test_with_a_memory_whole_exchanges_go_to_the_memory(chat):
    model, tokenizer = chat
    session = _session(chat, evict="turns", memory=BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8))
    fed, handle = _recording(model)
    try:
        for question in QUESTIONS:
            "".join(session.reply(question))
            counts = session.cache.counts
            # (the random model writes a role token now and then, which the transcript leaves out)
            window = tokenizer.decode(fed[len(fed) - counts.window :]).replace("<|system|>", "")
            transcript = tokenizer.apply_chat_template(session.messages, tokenize=False).replace("<|system|>", "")
            assert transcript.endswith(window)
            if counts.partial or counts.blocks:  # evicted: whole messages only (before, the first user
                assert window.startswith("<|user|>")  # header is among the pinned sinks)
            assert counts.window == sum(t for _, t in session.held.units)
    finally:
        handle.remove()
    assert session.cache.memory_blocks >= 5


def test_token_eviction_cuts_messages_and_turns_need_a_valid_mode(chat):
    """The control: StreamingLLM's token eviction leaves part of a message at the window's start."""
    model, tokenizer = chat
    session = _session(chat, memory=BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8))
    fed, handle = _recording(model)
    try:
        cut = 0
        for question in QUESTIONS:
            "".join(session.reply(question))
            counts = session.cache.counts
            cut += bool(counts.partial or counts.blocks) and not tokenizer.decode(
                fed[len(fed) - counts.window :]).startswith("<|user|>")
    finally:
        handle.remove()
    assert cut >= 3
    with pytest.raises(ArgumentError, match="evict must be one of tokens, turns"):
        _session(chat, evict="messages")


def test_a_saved_session_keeps_its_turn_bookkeeping(chat, tmp_path):
    session = _session(chat, evict="turns", memory=BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8))
    for question in QUESTIONS[:5]:
        "".join(session.reply(question))
    session.save(tmp_path / "chat.pt")
    again = _session(chat, evict="turns", memory=BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8))
    again.load(tmp_path / "chat.pt")
    assert again.held.units == session.held.units
    torch.manual_seed(0)
    a = "".join(session.reply(QUESTIONS[5]))
    b = "".join(again.reply(QUESTIONS[5]))
    assert a == b
