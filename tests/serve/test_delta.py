"""Per-turn state deltas (streamingllm.serve.delta): chained over long evicting conversations on
tiny models, they rebuild every turn's state bit for bit, and continue with the live logits."""

from __future__ import annotations

import random
import string

import pytest
import torch
from tiny import tiny_model

from streamingllm.cache import SinkCache
from streamingllm.feed import prefill
from streamingllm.serve.delta import apply_delta, decode, diff_state, encode, rebased, states_equal, tensor_bytes
from streamingllm.session import Session

ROLES = ("system", "user", "assistant")
REBASE_EVERY = 40  # tokens: several rebases in a conversation of a few hundred tokens


@pytest.fixture(scope="module")
def tokenizer():
    """A character-level chat tokenizer: one token per character, one per role, ``<|end|>`` ends
    a turn; short turns, so that a 28-token window holds a few."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<|end|>"] + [f"<|{r}|>" for r in ROLES]
    vocab = {t: i for i, t in enumerate(special + list("\n" + string.printable[:95]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|end|>",
                                  additional_special_tokens=special[2:])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def _session(model, tokenizer, window_size: int = 28) -> Session:
    session = Session(model, tokenizer, 4, window_size, system="Be brief.", max_new_tokens=6, chunk_size=8,
                      compile=False)
    session.cache = SinkCache(model, 4, window_size, rebase_every=REBASE_EVERY)
    return session


def _messages(n: int, seed: int = 0, long_every: int = 7) -> list[str]:
    """User messages of 1 to 10 characters, and one of 45 (longer than the window) every ``long_every``."""
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_letters + " ", k=45 if i % long_every == long_every - 1
                                else rng.randint(1, 10))).strip() or "x" for i in range(n)]


def _next_logits(model, session: Session) -> torch.Tensor:
    return prefill(model, session.cache, torch.tensor([[7]]), chunk_size=1)


def _literal_slots(delta: dict, part: str | None = None) -> list[int]:
    """Per layer: the literal slots of its keys or values (``part``), or the more of the two."""
    parts = (part,) if part else ("keys", "values")
    return [max(e[p]["literal"].shape[2] for p in parts) for e in delta["layers"] if e is not None]


class _Chain:
    """Deltas of a stream's states, each encoded, decoded and applied to the state the previous ones rebuilt."""

    def __init__(self):
        self.prev = self.rebuilt = None
        self.rebases = self.bounded = 0  # rebases seen; deltas whose size was checked

    def step(self, cur: dict, where: str) -> None:
        """Check the delta to ``cur``: whole first, then bit for bit, and about the slots added
        (without a rebase: the slots the stream added, and a decode ring's free one)."""
        delta = decode(encode(diff_state(self.prev, cur)))
        assert ("whole" in delta) == (self.prev is None), where
        self.rebuilt = apply_delta(self.rebuilt, delta)
        assert states_equal(self.rebuilt, cur), where
        if self.prev is not None and not rebased(self.prev, cur):
            added = cur["cache"]["timelines"][0]["seen"] - self.prev["cache"]["timelines"][0]["seen"]
            held = [k.shape[2] for k, _, _ in cur["cache"]["layers"]]
            assert all(n <= min(added, h) + 1 for n, h in zip(_literal_slots(delta), held)), (where, added)
            self.bounded += 1
        elif self.prev is not None:  # a rebase rotated the keys, not the values: those are still referenced
            added = cur["cache"]["timelines"][0]["seen"] - self.prev["cache"]["timelines"][0]["seen"]
            held = [k.shape[2] for k, _, _ in cur["cache"]["layers"]]
            assert all(n <= min(added, h) + 1 for n, h in zip(_literal_slots(delta, "values"), held)), (where, added)
        self.rebases += rebased(self.prev, cur)
        self.prev = cur


@pytest.mark.parametrize("family, rebases", [("gpt_neox", False), ("llama", True), ("gemma", True),
                                             ("gemma2", True), ("bloom", False)])  # RoPE, GQA, MQA, hybrid, ALiBi
def test_chained_deltas_rebuild_every_turn_bit_for_bit(family, rebases, tokenizer):
    """Turn after turn (prompt chunks, decode steps in a ring, evictions, compactions, rebases), and
    in the middle of replies, each delta (encoded, decoded) applied to the state the previous ones
    rebuilt gives the live state bit for bit; a fresh session on it continues with the live
    logits; without a rebase a delta stores only about the slots the stream added."""
    model = tiny_model(family, vocab_size=len(tokenizer))
    live, chain = _session(model, tokenizer), _Chain()
    rings = 0
    for i, text in enumerate(_messages(24)):
        for j, _ in enumerate(live.reply(text)):
            if i % 2 and j == 2:  # mid-reply: a decode ring
                chain.step(live.state(), f"turn {i}, mid-reply")
                rings += chain.prev["cache"]["timelines"][0]["ring"]
        chain.step(live.state(), f"turn {i}")
        if i % 6 == 5:
            fresh = _session(model, tokenizer)
            fresh.restore(chain.rebuilt)
            torch.testing.assert_close(_next_logits(model, fresh), _next_logits(model, live), atol=1e-5, rtol=0)
            chain.step(live.state(), f"turn {i}, probed")  # the probe token is part of the live stream now
    assert live.cache.seen_tokens > 10 * live.cache.max_cached_tokens and chain.bounded >= 20
    assert rings >= (5 if family != "bloom" else 0) and (chain.rebases >= 2) == rebases, (rings, chain.rebases)


def test_a_short_turn_writes_about_its_slots(tokenizer):
    """Once the window is full, a turn of t tokens stores about t slots per layer: well under the state."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    live = _session(model, tokenizer, window_size=124)
    for text in _messages(12, seed=1, long_every=4):
        "".join(live.reply(text))
    prev = live.state()
    "".join(live.reply("hi"))
    cur = live.state()
    assert not rebased(prev, cur)
    delta = diff_state(prev, cur)
    added = live.cache.seen_tokens - prev["cache"]["timelines"][0]["seen"]
    keys, values, _ = cur["cache"]["layers"][0]
    slot = (keys[:, :, :1].numel() + values[:, :, :1].numel()) * keys.element_size()
    small = tensor_bytes(cur["cache"]["sinks"]) + tensor_bytes([s for _, _, s in cur["cache"]["layers"]])
    runs = tensor_bytes([[e["keys"]["runs"], e["values"]["runs"]] for e in delta["layers"]])
    assert added <= 12 and max(_literal_slots(delta)) <= added + 1
    assert tensor_bytes(delta) <= (added + 1) * slot * len(delta["layers"]) + small + runs
    assert tensor_bytes(delta) < tensor_bytes(cur) / 4
    assert len(encode(delta)) < len(encode(cur)) / 2  # the container's overhead included
    assert delta["messages"] == {"keep": len(prev["messages"]), "added": cur["messages"][len(prev["messages"]):]}
    assert states_equal(apply_delta(prev, delta), cur)


def test_a_turns_delta_does_not_grow_with_the_conversation(tokenizer):
    """The delta of a short turn ("ok", no rebase) after 20 turns is about as large encoded as
    after 2 (the bound: by less than half of what the old transcript takes encoded): messages
    are stored as what the turn appended, and ``last`` holds only the last turn's. Negative
    control: the transcript stored whole breaks the bound."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    live, sizes = _session(model, tokenizer), {}
    for i, text in enumerate(_messages(26, seed=2, long_every=100)):
        "".join(live.reply(text))
        prev = live.state()
        "".join(live.reply("ok"))
        cur = live.state()
        delta = diff_state(prev, cur)
        assert states_equal(apply_delta(prev, delta), cur) and len(delta["messages"]["added"]) == 2
        assert [m["content"] for m in cur["last"]][0] == "ok" and len(cur["last"]) == 2
        if not rebased(prev, cur) and i >= (2 if not sizes else 20):  # turn 2's delta, then turn 20's
            sizes[len(sizes)] = len(encode(delta)), len(encode(prev["messages"]))
            if len(sizes) == 2:
                break
    (early, _), (late, transcript) = sizes[0], sizes[1]
    assert len(prev["messages"]) > 80 and late - early < transcript / 2, sizes
    whole = {**delta, "messages": {"keep": 0, "added": cur["messages"]}}
    assert len(encode(whole)) - late >= transcript / 2 and states_equal(apply_delta(prev, whole), cur)


def test_corrupted_or_misapplied_deltas_are_refused_or_differ(tokenizer):
    """Negative controls: a reference outside the slots is refused, one moved inside them gives
    another state, a delta applied to a state it was not made from is refused, and the equality
    sees a sign bit."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    live = _session(model, tokenizer)
    states = []
    for text in _messages(8, long_every=100):
        "".join(live.reply(text))
        states.append(live.state())
        if len(states) > 3 and not rebased(states[-2], states[-1]):
            break
    delta = diff_state(states[-2], states[-1])
    entry = next(e["keys"] for e in delta["layers"] if len(e["keys"]["runs"]) and int(e["keys"]["runs"][:, 2].max()) >= 2)
    good = entry["runs"].clone()
    row = int(entry["runs"][:, 2].argmax())
    entry["runs"][row, 1] = states[-2]["cache"]["layers"][0][0].shape[2]  # past the old slots
    with pytest.raises(ValueError, match="reference run"):
        apply_delta(states[-2], delta)
    entry["runs"] = good.clone()
    entry["runs"][row, 1] += 1 if int(good[row, 1]) == 0 else -1  # in range, one slot off
    assert not states_equal(apply_delta(states[-2], delta), states[-1])
    entry["runs"] = good
    assert states_equal(apply_delta(states[-2], delta), states[-1])
    with pytest.raises(ValueError, match="another state"):
        apply_delta(states[-3], delta)
    assert not states_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert states_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))


def test_first_states_and_edited_histories_are_stored_whole(tokenizer):
    """No previous state, or an empty cache: the delta is the state; an edited history stores its
    messages whole; Session.state/restore round-trip through encode/decode."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    live = _session(model, tokenizer)
    empty = live.state()
    assert empty["cache"]["sinks"] is None and diff_state(None, empty)["whole"] is empty
    "".join(live.reply("hello"))
    first = live.state()
    assert diff_state(empty, first)["whole"] is first
    assert states_equal(decode(encode(first)), first)
    with pytest.raises(ValueError, match="cannot decode"):
        decode(b"not a state")
    live.start(live.prepare([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "other"}]))
    live.finish([], "", True)
    edited = live.state()
    delta = diff_state(first, edited)
    assert delta["messages"]["keep"] == 0 and delta["messages"]["added"] == edited["messages"]
    assert states_equal(apply_delta(first, delta), edited)
    again = _session(model, tokenizer)
    again.restore(decode(encode(edited)))
    restored = again.state()  # a restored timeline rewrites its sinks at the next step: sinks_in_buffer None
    for t in restored["cache"]["timelines"] + edited["cache"]["timelines"]:
        t.pop("sinks_in_buffer")
    assert states_equal(restored, edited)
    with pytest.raises(ValueError, match="not a conversation"):
        again.restore({"format": 0})


def _memory_literal_rows(entry: dict) -> int:
    """Rows (tokens) a memory layer's delta stores as literals: in its window, its partial block and
    its new blocks (the larger of keys and values)."""
    parts = [entry["window"], entry["partial"], *entry["store"]["added"]]
    return sum(max(p["keys"]["literal"].shape[2], p["values"]["literal"].shape[2]) if isinstance(p, dict)
               else 0 if p is None else p[0].shape[1] for p in parts)


def _memory_session(model, tokenizer, memory) -> Session:
    return Session(model, tokenizer, 4, 28, system="Be brief.", max_new_tokens=6, chunk_size=8, compile=False,
                   memory=memory, evict="turns")


@pytest.mark.parametrize("store", ["memory", "forgetting", "spilling"])
def test_a_memory_sessions_deltas_rebuild_every_turn_and_store_only_its_new_blocks(tokenizer, tmp_path, store):
    """A session with a memory of blocks (turns evicted whole into it): each delta, encoded and
    applied to the state the previous ones rebuilt, gives the live state bit for bit, mid-reply too;
    it refers to the old blocks, and stores of the window, partial block and new blocks only the
    rows of the tokens the turn fed (the others are references to the old window and partial
    block), so it stays small while the store grows; past a bound (forgotten or spilled blocks)
    likewise. A
    fresh session on the rebuilt state continues with the live logits."""
    from streamingllm import BlockMemory

    bound = {"memory": {}, "forgetting": {"max_cpu_blocks": 3},
             "spilling": {"max_cpu_blocks": 3, "spill_dir": str(tmp_path)}}[store]
    memory = BlockMemory(block_size=4, top_k=2, repr_keys=2, chunk_size=8, **bound)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    live = _memory_session(model, tokenizer, memory)
    prev = rebuilt = None
    sizes = []
    for i, text in enumerate(_messages(20, seed=5, long_every=100)):
        for j, _ in enumerate(live.reply(text)):
            if i % 3 == 1 and j == 2:
                cur = live.state()
                rebuilt = apply_delta(rebuilt, decode(encode(diff_state(prev, cur))))
                assert states_equal(rebuilt, cur), (i, "mid-reply")
                prev = cur
        cur = live.state()
        delta = decode(encode(diff_state(prev, cur)))
        assert ("whole" in delta) == (prev is None), i
        rebuilt = apply_delta(rebuilt, delta)
        assert states_equal(rebuilt, cur), i
        if "memory_layers" in delta:
            blocks = len(cur["cache"]["layers"][0]["store"]["blocks"])
            added = blocks - len(prev["cache"]["layers"][0]["store"]["blocks"])
            assert all(len(e["store"]["added"]) == added for e in delta["memory_layers"])
            fed = cur["cache"]["counts"][0] - prev["cache"]["counts"][0]
            literal = max(_memory_literal_rows(e) for e in delta["memory_layers"])
            assert literal <= fed, (i, literal, fed)  # every row held before is a reference
            sizes.append((tensor_bytes(delta), tensor_bytes(cur), blocks))
        prev = cur
    fresh = _memory_session(model, tokenizer, memory)
    fresh.restore(rebuilt)
    torch.testing.assert_close(_next_logits(model, fresh), _next_logits(model, live), atol=1e-5, rtol=0)
    assert sizes[-1][2] >= 10 and len(sizes) >= 12, sizes
    assert sizes[-1][0] < sizes[-1][1] / 3  # the late deltas are a fraction of the state
    if store != "memory":
        forgotten = sum(b is None for b in cur["cache"]["layers"][0]["store"]["blocks"])
        assert (forgotten > 0) == (store == "forgetting")


def test_a_memory_delta_applied_to_another_state_is_refused(tokenizer):
    """Negative controls: a memory delta onto an older state, onto a token-eviction session's
    state, or with its block references moved past the old store, is refused."""
    from streamingllm import BlockMemory

    memory = BlockMemory(block_size=4, top_k=2, repr_keys=2, chunk_size=8)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    live, states = _memory_session(model, tokenizer, memory), []
    for text in _messages(10, seed=6, long_every=100):
        "".join(live.reply(text))
        states.append(live.state())
    delta = diff_state(states[-2], states[-1])
    assert "memory_layers" in delta and states_equal(apply_delta(states[-2], delta), states[-1])
    with pytest.raises(ValueError, match="another state"):
        apply_delta(states[-3], delta)
    plain = _session(model, tokenizer)
    "".join(plain.reply("hello"))
    with pytest.raises(ValueError, match="another state"):
        apply_delta(plain.state(), delta)
    assert "whole" in diff_state(plain.state(), states[-1]) and "whole" in diff_state(states[-1], plain.state())
    delta["memory_layers"][0]["store"]["kept"] += 1
    with pytest.raises(ValueError, match="blocks"):
        apply_delta(states[-2], delta)
