"""Conversations on a sink cache: one :class:`Session` per conversation.

A session holds a :class:`~streamingllm.cache.SinkCache` (or, with ``memory=``, a
:class:`~streamingllm.cache.MemoryCache`) and the transcript it has consumed.
Each turn feeds only the tokens that turn adds to the chat template (the new user message and
the assistant prefix), generates the reply, then feeds the template's end of the assistant turn,
so the cache always holds the conversation exactly as the template writes it -- minus what was
evicted. Memory stays bounded however long the conversation.

Tokens are chosen by :class:`~streamingllm.sampling.TokenChooser` (through
:func:`~streamingllm.feed.generate_tokens`) and shown through :class:`~streamingllm.text.ReplyText`;
:class:`TextDecoder` and :class:`StopStrings` are importable from here as before.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .cache import BlockMemory, MemoryCache, SinkCache
from .checks import ArgumentError, check_choice, check_int
from .compiled import DecodeStep
from .feed import Sampling, generate_tokens, prefill
from .text import ReplyText, StopStrings, TextDecoder  # noqa: F401 (the last two: re-exported from their old home)
from .turns import HeldTurns

#: How a conversation leaves the window: token by token (StreamingLLM), or whole exchanges at once.
EVICTION = ("tokens", "turns")

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer) -> frozenset[int]:
    """The ids that end an assistant turn: EOS and the end-of-turn tokens the vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return frozenset(ids)


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    return len(os.path.commonprefix([a, b]))


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    """The chat template's text for ``messages`` (with the assistant prefix when ``generation_prompt``)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def read_state(path) -> dict:
    """The state :meth:`Session.save` wrote to ``path`` (gzipped or not), read with
    ``weights_only=True`` (no code runs); ValueError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":  # saved with compress=True
            data = gzip.decompress(data)
        return torch.load(io.BytesIO(data), weights_only=True)
    except (OSError, RuntimeError, EOFError, zlib.error, pickle.UnpicklingError) as err:
        raise ValueError(f"cannot read a saved conversation from {path}: {err}".split("\n")[0]) from None


def template_delta(tokenizer, last: list[dict], new: list[dict], whole: bool = False) -> str:
    """The template text ``new`` messages add after a stream that holds ``last`` (the previous
    turn, enough context for templates that treat the first message specially), ending with the
    assistant prefix; the whole rendering of ``last + new`` when ``whole``."""
    full = render(tokenizer, last + new, True)
    if whole:
        return full
    return full[_common_prefix(full, render(tokenizer, last, False)) :]


def turn_end(tokenizer, turn: list[dict], reply: str) -> str:
    """The template text that closes an assistant ``reply`` to ``turn`` (the messages it answers),
    after the reply's own text: e.g. ``<|im_end|>\n``."""
    closed = render(tokenizer, turn + [{"role": "assistant", "content": reply}], False)
    found = next((t for t in (reply, reply.strip()) if t and t in closed), None)
    if found:
        return closed[closed.rfind(found) + len(found) :]
    return closed[_common_prefix(closed, render(tokenizer, turn, True)) :]


class Session:
    """One conversation with a chat model on a bounded cache.

    Args:
        model: a causal LM whose family :class:`SinkCache` supports.
        tokenizer: its tokenizer, with a chat template.
        sink_size: attention-sink tokens kept (tokens, >= 0).
        window_size: most recent tokens kept (tokens, >= 1).
        system: the system prompt, or None.
        sampling: how reply tokens are chosen (including repetition/presence penalties).
        max_new_tokens: most tokens per reply (>= 1).
        chunk_size: prompt tokens per forward pass (>= 1).
        min_new_tokens: the end-of-turn tokens are suppressed for this many reply tokens (>= 0).
        stop: strings that end a reply; the reply shown stops before the first one (the cache
            and the transcript keep what the model wrote, stop string included).
        pin_system: keep the whole system prompt as attention sinks: its tokens are never
            evicted, so the assistant keeps its instructions however long the conversation. The
            cache then holds ``max(sink_size, pinned_tokens) + window_size`` tokens.
        compile: the decode steps compiled once the cache is full (``"auto"``: on CUDA), or a
            :class:`~streamingllm.compiled.DecodeStep`; compiled once for all the turns.
        memory: keep what leaves the window in a memory of blocks (:class:`~streamingllm.cache.BlockMemory`,
            InfLLM's design): the session's cache is then a :class:`~streamingllm.cache.MemoryCache`.
        evict: ``"tokens"`` (StreamingLLM: the oldest tokens leave one by one as new ones come) or
            ``"turns"``: before a turn is fed, whole oldest exchanges (user message, reply, role
            headers) leave until the turn and a reply of ``max_new_tokens`` fit in the window, so the
            window never holds part of a message. With a memory they go to it whole; without one the
            kept exchanges are fed again (a cost of up to the window's length, on the turns that
            evict). A turn longer than the whole window still evicts by tokens, as does a
            conversation fed whole (a new or rebuilt session: a client's history sent at once).

    Attributes:
        cache: the session's :class:`SinkCache`, or :class:`~streamingllm.cache.MemoryCache` with a
            memory (``cache.seen_tokens`` counts the whole conversation).
        held: turn eviction's count of the exchanges in the window (:class:`~streamingllm.turns.HeldTurns`).
        messages: the transcript so far (system, user and assistant messages).
        pinned_tokens: template tokens of the system prompt kept as sinks (0 without ``pin_system``).

    A :class:`~streamingllm.client.Conversation`, as a :class:`~streamingllm.client.RemoteSession` is.
    """

    interruptible = False  # stop a reply between pieces only (close()): never inside a forward pass
    can_save = True

    def __init__(self, model, tokenizer, sink_size: int = 4, window_size: int = 1020, *, system: str | None = None,
                 sampling: Sampling = Sampling(), max_new_tokens: int = 256, chunk_size: int = 256,
                 min_new_tokens: int = 0, stop: tuple[str, ...] | list[str] = (), pin_system: bool = False,
                 compile: str | bool | DecodeStep = "auto", memory: BlockMemory | None = None,
                 evict: str = "tokens"):
        if not getattr(tokenizer, "chat_template", None):
            raise ArgumentError("tokenizer", "must have a chat template: a Session needs a chat (instruct) model")
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        self.decode = compile if isinstance(compile, DecodeStep) else DecodeStep(model, compile)
        self.min_new_tokens = check_int("min_new_tokens", min_new_tokens, 0)
        if isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop):
            raise ArgumentError("stop", "must be a list of non-empty strings", stop)
        self.stop = tuple(stop)
        self.system = system
        if pin_system and not system:
            raise ArgumentError("pin_system", "needs a system prompt to pin (system=...)", pin_system,
                                mentions=("system",))
        self.pinned_tokens = self._system_tokens() if pin_system else 0
        self.evict = check_choice("evict", evict, EVICTION)
        sinks = max(sink_size, self.pinned_tokens)
        self.cache = (SinkCache(model, sink_size=sinks, window_size=window_size) if memory is None
                      else MemoryCache(model, sinks, window_size, memory))
        self.held = HeldTurns()  # turn eviction: the exchanges the window holds
        self.stop_ids = stop_token_ids(tokenizer)
        self.reset()

    def _system_tokens(self) -> int:
        """Tokens the template writes before the first user message's content (the system prompt
        and the turn headers): the token prefix that two different first messages share."""
        a, b = ({"role": "user", "content": c} for c in ("a", "b"))
        system = {"role": "system", "content": self.system}
        ids_a = self._encode(render(self.tokenizer, [system, a], True)).tolist()
        ids_b = self._encode(render(self.tokenizer, [system, b], True)).tolist()
        return len(os.path.commonprefix([ids_a, ids_b]))

    def reset(self) -> None:
        """Forget the conversation (the system prompt is kept)."""
        self.cache.reset()
        self.held.clear()
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._last: list[dict] = list(self.messages)  # the messages the template delta is computed against
        self._pending: list[dict] | None = None  # the new messages of the turn prepare() opened

    def stats(self, refresh: bool = False) -> dict[str, int]:
        """``seen_tokens``, ``cached_tokens``, ``max_cached_tokens``, ``pinned_tokens`` (tokens) and
        ``turns`` (user messages), always current (``refresh`` changes nothing here)."""
        return {"seen_tokens": self.cache.seen_tokens, "cached_tokens": self.cache.cached_tokens,
                "max_cached_tokens": self.cache.max_cached_tokens, "pinned_tokens": self.pinned_tokens,
                "turns": sum(m["role"] == "user" for m in self.messages)}

    def state(self) -> dict:
        """The conversation as :meth:`save` writes it: ``format``, ``cache`` (the cache's
        :meth:`~streamingllm.cache.SinkCache.state_dict`: the tokens it holds, not its empty
        slots), ``messages``, ``last``, ``system``, ``pinned_tokens`` and ``held`` (turn eviction's
        exchanges in the window). Tensors and lists are
        copies, or (a memory's blocks, written once) never changed: the dict does not change as the
        conversation goes on."""
        return {"format": 1, "cache": self.cache.state_dict(), "messages": [dict(m) for m in self.messages],
                "last": [dict(m) for m in self._last], "system": self.system, "pinned_tokens": self.pinned_tokens,
                "held": [list(u) for u in self.held.units]}

    def restore(self, state: dict, *, source: str = "the state") -> None:
        """Continue the conversation a :meth:`state` dict holds (same model and cache sizes;
        ValueError otherwise). The session's system prompt becomes the saved one.

        Args:
            state: a dict :meth:`state` returned (or :meth:`save` wrote); it is not kept.
            source: what the state came from, named in the errors (a path, a store key).
        """
        if not isinstance(state, dict) or state.get("format") != 1:
            raise ValueError(f"{source} is not a conversation saved by streamingllm")
        if state["pinned_tokens"] != self.pinned_tokens and state["pinned_tokens"]:
            raise ValueError(f"{source} pins {state['pinned_tokens']} system tokens; start the chat with --pin-system")
        self.cache.load_state_dict(state["cache"])
        self.messages, self._last = [dict(m) for m in state["messages"]], [dict(m) for m in state["last"]]
        self.system = state["system"]
        self.held.units = [list(u) for u in state.get("held", [])]

    def save(self, path, compress: bool = False) -> None:
        """Write the conversation (:meth:`state`) to ``path``: the transcript and the cache's exact
        state, so that :meth:`load` continues it with the same next-token logits. ``compress``: gzip
        the file (lossless; smaller by what the values' bits allow)."""
        state = self.state()
        if not compress:
            torch.save(state, path)
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with open(path, "wb") as f:
            f.write(gzip.compress(buffer.getbuffer(), compresslevel=6))

    def load(self, path) -> None:
        """Continue the conversation :meth:`save` wrote to ``path`` (same model and cache sizes;
        ValueError otherwise). The session's system prompt becomes the saved one."""
        self.restore(read_state(path), source=str(path))

    def _encode(self, text: str):
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]

    def turn_prompt(self, user_text: str) -> str:
        """The template text this user message adds to what the cache holds (with the assistant prefix)."""
        return self._delta([{"role": "user", "content": user_text}])

    def _delta(self, new: list[dict], last: list[dict] | None = None, empty: bool | None = None) -> str:
        """The template text ``new`` messages add after ``last`` (default: what the cache holds),
        ending with the assistant prefix; the whole rendering when the cache is ``empty``."""
        whole = (not self.cache.seen_tokens) if empty is None else empty
        return template_delta(self.tokenizer, self._last if last is None else last, new, whole)

    def prepare(self, messages: list[dict], max_new_tokens: int | None = None) -> Turn:
        """Match a whole conversation (as an OpenAI-style client sends it, ending with a user
        message) against the transcript, and say which tokens a turn for it must feed.

        When the transcript is a prefix of ``messages`` (contents compared without surrounding
        whitespace), only the messages after it are fed; otherwise (an edited or shortened
        history, another system prompt) the session is rebuilt: reset, and the conversation fed
        whole. Nothing changes here: :meth:`start` opens the turn, then feed
        ``Turn.prompt_ids`` (e.g. with :func:`~streamingllm.feed.generate_tokens`) and call
        :meth:`finish` with the reply. ValueError for malformed messages, and for a system prompt
        other than the session's when it is pinned (the cache's sink region is sized for it).
        ``max_new_tokens``: the reply's longest length, for which turn eviction makes room (default
        the session's).
        """
        messages = check_messages(messages)
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        if system != self.system and self.pinned_tokens:
            raise ValueError("this session pins its system prompt; a conversation with another system prompt "
                             "needs a new session")
        n = len(self.messages)
        if self.cache.seen_tokens and system == self.system and _same_messages(messages[:n], self.messages):
            new = messages[n:]
            turn = Turn(self._encode(self._delta(new)), self.cache.seen_tokens, "continued", new, system)
            reply = self.max_new_tokens if max_new_tokens is None else max_new_tokens
            return self._make_room(turn, reply) if self.evict == "turns" else turn
        head = [{"role": "system", "content": system}] if system is not None else []
        new = messages[len(head) :]
        return Turn(self._encode(self._delta(new, head, empty=True)), 0, "rebuilt" if self.cache.seen_tokens else "new",
                    new, system)

    def _make_room(self, turn: Turn, reply: int) -> Turn:
        """Turn eviction: the continued ``turn`` with the oldest whole exchanges planned to leave, so
        that it and a reply of ``reply`` tokens fit in the window (see :mod:`streamingllm.turns`)."""
        need = len(turn.prompt_ids) + reply + len(self._encode(turn_end(self.tokenizer, turn.new, "")))
        cache = self.cache
        if isinstance(cache, MemoryCache):
            exchanges, _, tokens = self.held.plan(need, cache.window_size - cache.counts.window)
            return Turn(turn.prompt_ids, turn.cached_tokens, turn.status, turn.new, turn.system,
                        evict_exchanges=exchanges, evict_tokens=tokens)
        if cache.cached_tokens + need <= cache.max_cached_tokens:
            return turn
        head = self.messages[:1] if self.messages and self.messages[0]["role"] == "system" else []
        held = self.messages[len(head) :]
        best = self._encode(self._delta(turn.new, head, empty=True)), len(held)  # nothing kept
        for i in reversed([i for i, m in enumerate(held) if m["role"] == "user"]):  # newest exchanges first
            ids = self._encode(self._delta(held[i:] + turn.new, head, empty=True))
            if len(ids) - len(turn.prompt_ids) + need > cache.max_cached_tokens:
                break  # keeping this exchange too would not fit: keep the newer ones
            best = ids, i
        ids, i = best
        return Turn(ids, 0, "rebuilt", turn.new, turn.system, kept=head + held[i:])

    def start(self, turn: Turn) -> None:
        """Open the turn :meth:`prepare` planned (resetting the session first when it is rebuilt;
        evicting whole exchanges first when it says so)."""
        if turn.kept is not None:  # turn eviction without a memory: the cache holds the kept exchanges only
            self.cache.reset()
            self.held.clear()
        elif turn.status != "continued":
            self.system = turn.system
            self.reset()
        if turn.evict_tokens:
            self.cache.evict(turn.evict_tokens)
        self.held.evicted(turn.evict_exchanges)
        self.held.opened(self.cache.seen_tokens)
        self._pending = turn.new

    def finish(self, reply_ids: list[int], shown: str, all_fed: bool) -> None:
        """Close the turn :meth:`prepare` opened, after its reply was generated.

        Args:
            reply_ids: the reply's token ids, end-of-turn token excluded. Generation feeds each
                token when it computes the next one, so all but the last have been fed.
            shown: the reply as the user saw it (cut at a stop string); the transcript keeps it,
                so a client that sends the conversation back matches it.
            all_fed: every token of ``reply_ids`` is in the cache already: the reply ended at an
                end-of-turn token (which is not fed: the turn's end is), or the caller's loop fed
                the last token before it stopped. False when the last one was not fed (a loop that
                stopped at a length or stop-string limit): it is fed here, with the turn's end.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("Session.finish: no turn is open (call prepare first)")
        text = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
        assistant = {"role": "assistant", "content": text}
        tail = turn_end(self.tokenizer, pending, text)
        if reply_ids and not all_fed:
            tail = self.tokenizer.decode(reply_ids[-1:]) + tail
        ids = self._encode(tail)
        if len(ids):
            prefill(self.model, self.cache, ids, chunk_size=self.chunk_size)
        self.messages += pending + [{"role": "assistant", "content": shown}]
        self._last = pending + [assistant]
        window = self.cache.counts.window if isinstance(self.cache, MemoryCache) else \
            self.cache.cached_tokens - self.cache.sink_size
        self.held.closed(len(pending) + 1, self.cache.seen_tokens, max(window, 0))

    def reply(self, user_text: str) -> Iterator[str]:
        """Add the user's message, and yield the assistant's reply as text pieces as they come.

        The turn is closed in the cache when the reply ends: at a stop token, after
        ``max_new_tokens``, or when the caller stops iterating (``close()`` on the generator, as
        a client that disconnects). An exception inside the model leaves the turn open.
        """
        if not isinstance(user_text, str) or not user_text.strip():
            raise ValueError("the user message is empty")
        turn = self.prepare(self.messages + [{"role": "user", "content": user_text}])
        self.start(turn)
        reply, stopped = ReplyText(self.tokenizer, self.stop), False
        try:
            for token in generate_tokens(self.model, self.cache, turn.prompt_ids, self.max_new_tokens, self.sampling,
                                         self.stop_ids, chunk_size=self.chunk_size, min_new_tokens=self.min_new_tokens,
                                         compile=self.decode):
                tid = int(token[0])
                if tid in self.stop_ids:
                    stopped = True
                    break
                piece = reply.add(tid)
                if piece:
                    yield piece
                if reply.stopped:
                    break
            rest = reply.flush()
            if rest:
                yield rest
        except GeneratorExit:  # the caller stopped reading: keep what was shown
            self.finish(reply.token_ids, reply.text, stopped)
            raise
        self.finish(reply.token_ids, reply.text, stopped)


@dataclass(frozen=True)
class Turn:
    """What :meth:`Session.prepare` found.

    Attributes:
        prompt_ids: the tokens to feed for the new messages (1D int64), ending with the assistant prefix.
        cached_tokens: tokens of the conversation consumed before (not fed again).
        status: ``"new"`` (an empty session), ``"continued"`` (the transcript matched) or
            ``"rebuilt"`` (the history differed: the session is reset and the conversation fed whole).
        new: the messages the turn adds to the transcript (before the reply).
        system: the conversation's system prompt (None without one).
        kept: turn eviction without a memory: the messages the cache is rebuilt with (the system
            prompt and the newest whole exchanges; ``prompt_ids`` renders them and ``new``); None
            otherwise. The transcript keeps every message.
        evict_exchanges, evict_tokens: turn eviction with a memory: the oldest exchanges, and their
            tokens, that :meth:`Session.start` moves from the window to the memory.
    """

    prompt_ids: torch.Tensor
    cached_tokens: int
    status: str
    new: list[dict]
    system: str | None
    kept: list[dict] | None = None
    evict_exchanges: int = 0
    evict_tokens: int = 0


ROLES = ("system", "user", "assistant")


def check_messages(messages) -> list[dict]:
    """``messages`` as a list of ``{"role", "content"}`` dicts with string contents, a system
    message first if any, ending with a user message; ValueError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{role: one of {', '.join(ROLES)}, content: string}}, got {m!r}")
        if m["role"] == "system" and i:
            raise ValueError(f"messages[{i}]: a system message may only come first")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise ValueError("the last message must be a non-empty user message")
    return out


def _same_messages(a: list[dict], b: list[dict]) -> bool:
    """Equal transcripts: same roles, same contents up to surrounding whitespace."""
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))
