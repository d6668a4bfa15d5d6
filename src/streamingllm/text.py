"""Turning generated tokens into the text a user is shown.

* :class:`TextDecoder` decodes token ids incrementally (multi-byte characters, leading spaces)
  at a constant cost per token.
* :class:`StopStrings` shows text up to the first stop string, holding back a tail that may be
  the start of one.
* :class:`ReplyText` is both for one reply: it takes the reply's token ids one by one and gives
  the text to show now; :class:`~streamingllm.session.Session` and the server's engine use it.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextDecoder:
    """Incremental detokenizer: :meth:`add` returns the text a new token adds (possibly '').

    Text is held back while it ends in an incomplete UTF-8 character. Decoding restarts every
    ``window`` tokens from the last ``context`` tokens, so the cost per token stays constant.

    Args:
        tokenizer: the model's tokenizer (special tokens are not shown).
        window: tokens decoded at most per call (>= ``context``).
        context: tokens kept when decoding restarts (they fix leading spaces).
    """

    def __init__(self, tokenizer, window: int = 64, context: int = 4):
        self.tokenizer, self.window, self.context = tokenizer, window, context
        self.ids: list[int] = []
        self.printed = 0  # characters of decode(ids) already returned

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        new, self.printed = text[self.printed :], len(text)
        if len(self.ids) > self.window:  # restart from the last tokens (they fix leading spaces)
            self.ids = self.ids[-self.context :]
            self.printed = len(self._decode(self.ids))
        return new


class StopStrings:
    """Text shown up to the first stop string: :meth:`add` takes the next piece of text and returns
    what can be shown now, holding back a tail that may be the start of a stop string.

    Args:
        stops: the stop strings (none: everything is shown at once).

    Attributes:
        text: all the text added; ``text[:shown]`` has been shown.
        stopped: a stop string was found (nothing more is shown).
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.text, self.shown, self.stopped = stops, "", 0, False

    def add(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        self.text += piece
        if not self.stops:
            return self._show(len(self.text))
        hits = [i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._show(min(hits))
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._show(len(self.text) - held)

    def flush(self) -> str:
        """What was held back, once the reply has ended without a stop string."""
        return "" if self.stopped else self._show(len(self.text))

    def _show(self, end: int) -> str:
        end = max(end, self.shown)
        out, self.shown = self.text[self.shown : end], end
        return out


class ReplyText:
    """One reply as it is generated: its token ids, and the text shown for them.

    :meth:`add` takes the next token id (an end-of-turn token is not added: it is not part of
    the reply) and returns the text to show now: decoded incrementally, cut before the first stop
    string, with a tail that may start one held back until :meth:`flush`.

    Args:
        tokenizer: the model's tokenizer.
        stop: strings that end the shown reply (it stops before the first one).

    Attributes:
        token_ids: the reply's token ids so far (what the model wrote, past a stop string too).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.token_ids: list[int] = []
        self._decoder = TextDecoder(tokenizer)
        self._shown = StopStrings(tuple(stop))

    def add(self, token_id: int) -> str:
        """The text token ``token_id`` adds to what is shown (possibly '')."""
        self.token_ids.append(int(token_id))
        return self._shown.add(self._decoder.add(token_id))

    def flush(self) -> str:
        """What was held back as a possible start of a stop string, once the reply has ended."""
        return self._shown.flush()

    @property
    def stopped(self) -> bool:
        """A stop string was hit: the reply should end (nothing more will be shown)."""
        return self._shown.stopped

    @property
    def text(self) -> str:
        """The text shown so far."""
        return self._shown.text[: self._shown.shown]
