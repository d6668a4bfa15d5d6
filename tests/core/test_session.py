"""Conversations: a Session feeds each turn's new template text only, and its cache holds exactly
the chat template's rendering of the transcript (default model; greedy)."""

from __future__ import annotations

import pytest

from streamingllm.session import Session, TextDecoder

pytestmark = pytest.mark.slow



def _recording(model):
    """Record the token ids of every forward pass."""
    fed: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: fed.extend(kwargs["input_ids"][0].tolist()),
                                             with_kwargs=True)
    return fed, handle


@pytest.mark.parametrize("window_size", [1020, 60])  # no eviction, and eviction within the first reply
def test_the_cache_holds_the_template_rendering_of_the_transcript(smollm, window_size):
    model, tokenizer = smollm
    session = Session(model, tokenizer, 4, window_size, system="Answer in one short sentence.", max_new_tokens=40)
    fed, handle = _recording(model)
    try:
        first = "".join(session.reply("What is the capital of France?"))
        second = "".join(session.reply("And of Italy?"))
    finally:
        handle.remove()
    assert "Paris" in first and "Rome" in second
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    transcript = tokenizer.apply_chat_template(session.messages, tokenize=False)
    assert tokenizer.decode(fed) == transcript  # each turn fed once, nothing re-read, the turns closed
    assert session.cache.seen_tokens == len(fed)
    assert session.cache.cached_tokens == min(len(fed), 4 + window_size)


def test_stopping_a_reply_early_still_closes_the_turn(smollm):
    model, tokenizer = smollm
    session = Session(model, tokenizer, 4, 200, max_new_tokens=100)
    fed, handle = _recording(model)
    try:
        reply = session.reply("Tell me a long story about a lighthouse keeper.")
        pieces = [next(reply) for _ in range(5)]
        reply.close()  # what Ctrl-C or a client disconnect does
        answer = "".join(session.reply("Thanks. What is 2 + 2?"))
    finally:
        handle.remove()
    assert session.messages[1] == {"role": "assistant", "content": "".join(pieces)}  # what was shown is kept
    assert tokenizer.decode(fed) == tokenizer.apply_chat_template(session.messages, tokenize=False)
    assert "4" in answer


def test_reset_forgets_the_conversation(smollm):
    model, tokenizer = smollm
    session = Session(model, tokenizer, 4, 200, system="Be brief.", max_new_tokens=8)
    "".join(session.reply("Hello"))
    session.reset()
    assert session.cache.seen_tokens == 0 and session.messages == [{"role": "system", "content": "Be brief."}]
    assert session.turn_prompt("Hi").startswith(tokenizer.apply_chat_template(session.messages, tokenize=False))


def test_text_decoder_equals_one_decode_at_constant_cost(smollm):
    _, tokenizer = smollm
    text = "Ünïcödé — naïve café, 東京, emoji 🙂, and plain words " * 6
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decoder = TextDecoder(tokenizer, window=16)
    out = "".join(decoder.add(i) for i in ids)
    assert out == tokenizer.decode(ids) and len(decoder.ids) <= 17


def test_a_pinned_system_prompt_is_never_evicted(smollm):
    """pin_system keeps the template's system part as sinks: after turns far past the window, the
    sinks are still exactly the system prompt's tokens."""
    model, tokenizer = smollm
    system = "You are a pirate. Always answer like a pirate, and end every answer with 'Arrr!'."
    session = Session(model, tokenizer, 4, 40, system=system, max_new_tokens=30, pin_system=True)
    prefix = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
    assert session.pinned_tokens >= len(tokenizer(prefix, add_special_tokens=False).input_ids) > 4
    assert session.cache.sink_size == session.pinned_tokens
    fed, handle = _recording(model)
    try:
        for question in ("What is the capital of France?", "And of Italy?", "And of Spain?"):
            "".join(session.reply(question))
    finally:
        handle.remove()
    assert session.cache.seen_tokens > session.pinned_tokens + 40  # the window has evicted
    assert session.cache.cached_tokens == session.pinned_tokens + 40
    assert tokenizer.decode(fed[: session.pinned_tokens]).startswith(prefix)  # the sinks: the system prompt
    plain = Session(model, tokenizer, 4, 40, system=system)
    assert plain.pinned_tokens == 0 and plain.cache.sink_size == 4


def test_stop_strings_end_the_shown_reply(smollm):
    model, tokenizer = smollm
    session = Session(model, tokenizer, 4, 200, system="You are a helpful assistant.", max_new_tokens=40,
                      stop=["Paris"])
    fed, handle = _recording(model)
    try:
        shown = "".join(session.reply("What is the capital of France?"))
    finally:
        handle.remove()
    assert "Paris" not in shown and shown.strip()
    assert session.messages[-1]["content"] == shown  # the transcript: what the user saw (a client sends it back)
    assert "Paris" in tokenizer.decode(fed)  # the cache: what the model wrote
    turn = session.prepare(session.messages + [{"role": "user", "content": "Thanks."}])
    assert turn.status == "continued"  # the shown reply matches the transcript


@pytest.mark.parametrize("compress", [False, True])
def test_a_saved_conversation_continues_exactly(smollm, tmp_path, compress):
    model, tokenizer = smollm
    session = Session(model, tokenizer, 4, 60, system="Answer in one short sentence.", max_new_tokens=30)
    "".join(session.reply("What is the capital of France?"))
    session.save(tmp_path / "chat.pt", compress=compress)
    assert (tmp_path / "chat.pt").read_bytes()[:2] == (b"\x1f\x8b" if compress else b"PK")  # gzip, or torch's zip
    again = Session(model, tokenizer, 4, 60, max_new_tokens=30)
    again.load(tmp_path / "chat.pt")
    assert again.messages == session.messages and again.cache.seen_tokens == session.cache.seen_tokens
    assert "".join(again.reply("And of Italy?")) == "".join(session.reply("And of Italy?"))
    with pytest.raises(ValueError, match="window_size"):
        Session(model, tokenizer, 4, 61).load(tmp_path / "chat.pt")
    with pytest.raises(ValueError, match="cannot read"):
        again.load(tmp_path / "missing.pt")


def test_prepare_matches_a_whole_conversation_and_changes_nothing(smollm):
    """What a stateless API client sends: the transcript as a prefix feeds only what follows; an
    edited history is rebuilt whole; prepare() itself feeds and resets nothing."""
    model, tokenizer = smollm
    session = Session(model, tokenizer, 4, 200, system="Answer in one short sentence.", max_new_tokens=20)
    "".join(session.reply("What is the capital of France?"))
    seen = session.cache.seen_tokens
    follow = session.messages + [{"role": "user", "content": "And of Italy?"}]
    turn = session.prepare(follow)
    assert turn.status == "continued" and turn.cached_tokens == seen
    assert tokenizer.decode(turn.prompt_ids) == session.turn_prompt("And of Italy?")
    padded = [dict(m, content=f"  {m['content']}\n") if m["role"] == "assistant" else m for m in follow]
    assert session.prepare(padded).status == "continued"  # whitespace around a reply does not matter
    edited = [follow[0], {"role": "user", "content": "What is the capital of Spain?"}]
    rebuilt = session.prepare(edited)
    assert rebuilt.status == "rebuilt" and rebuilt.cached_tokens == 0
    assert tokenizer.decode(rebuilt.prompt_ids) == tokenizer.apply_chat_template(edited, tokenize=False,
                                                                                add_generation_prompt=True)
    assert session.cache.seen_tokens == seen and len(session.messages) == 3  # nothing changed yet
    for bad in ([], [{"role": "user"}], follow[:-1] + [{"role": "assistant", "content": "x"}],
                [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]):
        with pytest.raises(ValueError):
            session.prepare(bad)
    pinned = Session(model, tokenizer, 4, 200, system="Answer in one short sentence.", pin_system=True)
    with pytest.raises(ValueError, match="pins its system prompt"):
        pinned.prepare([{"role": "system", "content": "Another."}, {"role": "user", "content": "Hi"}])
