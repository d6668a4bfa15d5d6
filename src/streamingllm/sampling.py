"""Choosing the next token: the one token loop shared by generation, sessions and the server.

* :class:`Sampling` says how a token is chosen (greedy, temperature, top-k, top-p, min-p, the
  repetition/presence/frequency penalties); it is a frozen setting, shared freely.
  :func:`model_sampling` reads a model's own recommendation from its ``generation_config``.
* :class:`TokenChooser` applies it to one stream: it owns the stream's random generator and its
  memory of recent tokens (for ``penalty_last_n``), and suppresses the stop tokens until the
  reply is ``min_new_tokens`` long. Each call takes the next-token logits and returns the token.

:func:`~streamingllm.feed.generate_tokens` keeps one chooser for its batch; the server keeps one
per request and calls it on that request's row of the batched decode step. For the same seed,
settings and logits both choose the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from .checks import check_float, check_int


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
        temperature: softmax temperature (> 0); 0 means greedy (argmax).
        top_k: keep only the k most likely tokens (0 = no limit).
        top_p: keep the smallest set of tokens whose probability sums to >= top_p (1 = no limit).
        min_p: keep only the tokens whose probability is >= min_p times the most likely token's
            (after the temperature; in [0, 1], 0 = no limit).
        seed: random seed for sampling (None = not seeded).
        repetition_penalty: divides the positive logits and multiplies the negative ones of the
            tokens among the last ``penalty_last_n`` (as transformers and llama.cpp do; > 0,
            1 = off, > 1 discourages repeats).
        presence_penalty: subtracted once from the logits of those tokens (OpenAI's; 0 = off).
        frequency_penalty: subtracted from their logits once per occurrence (OpenAI's; 0 = off).
        penalty_last_n: how many of the most recent tokens (prompt and reply) the penalties look
            at (>= 0; bounded, like everything in a stream).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    min_p: float = 0.0

    def __post_init__(self):
        check_float("temperature", self.temperature, 0.0)
        check_int("top_k", self.top_k, 0)
        check_float("top_p", self.top_p, 0.0, 1.0, open_min=True)
        check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            check_int("seed", self.seed, -(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
        check_float("repetition_penalty", self.repetition_penalty, 0.0, open_min=True)
        check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        check_int("penalty_last_n", self.penalty_last_n, 0)

    @property
    def penalizes(self) -> bool:
        """True when any penalty is on (so the caller must keep the recent tokens)."""
        return bool(self.penalty_last_n) and (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)

    def penalize(self, logits: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, vocab) with the penalties applied for the ``recent`` tokens (B, n) int64."""
        if not self.penalizes or recent.shape[-1] == 0:
            return logits
        logits = logits.float()
        counts = torch.zeros_like(logits).scatter_add_(-1, recent, torch.ones_like(recent, dtype=logits.dtype))
        present = counts > 0
        if self.repetition_penalty != 1.0:
            scaled = torch.where(logits > 0, logits / self.repetition_penalty, logits * self.repetition_penalty)
            logits = torch.where(present, scaled, logits)
        return logits - self.presence_penalty * present - self.frequency_penalty * counts

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Choose the next token for each row of ``logits`` (B, vocab); returns (B,) int64."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= self.top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        if self.min_p > 0:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < self.min_p * probs.amax(-1, keepdim=True), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
"""The settings a transformers ``GenerationConfig`` may recommend (the names are the same)."""


def model_sampling(generation_config, penalty_last_n: int = 64) -> Sampling | None:
    """The sampling a model recommends in its ``generation_config`` (a transformers
    ``GenerationConfig``), or None when it recommends none (it sets none of SAMPLING_KEYS).

    The recommendation is taken whole: the keys it does not set are off (top-k, top-p and min-p
    unlimited, no penalty; temperature 1), and ``do_sample: false`` makes it greedy.
    ``penalty_last_n`` (tokens) is the penalties' memory, which transformers does not bound.
    """
    to_diff_dict = getattr(generation_config, "to_diff_dict", None)
    own = to_diff_dict() if to_diff_dict else {}  # only what the model's config sets
    given = {k: own[k] for k in SAMPLING_KEYS if own.get(k) is not None}
    if not given:
        return None
    sampling = Sampling(**{"temperature": 1.0, **given, "penalty_last_n": penalty_last_n})
    return replace(sampling, temperature=0.0) if own.get("do_sample") is False else sampling


class TokenChooser:
    """Chooses one stream's tokens, step after step: penalise the recent tokens, suppress the stop
    tokens while the reply is shorter than ``min_new_tokens``, pick, remember what was picked.

    Args:
        sampling: how each token is chosen.
        prompt_ids: the tokens fed before the first choice, (B, T) or (T,) int; their last
            ``sampling.penalty_last_n`` start the memory the penalties look at (one row per stream).
        device: where the logits will be (the model's device): the generator and the memory live there.
        stop_token_ids: the token ids that end a reply.
        min_new_tokens: those are suppressed (logit -inf) for this many choices (tokens, >= 0).

    Attributes:
        generator: the stream's random generator, seeded with ``sampling.seed`` (None: not seeded).
        recent: the tokens the penalties look at, (B, <= penalty_last_n) int64; None without penalties.
        chosen: tokens chosen so far.
    """

    def __init__(self, sampling: Sampling, prompt_ids, device: torch.device | str,
                 stop_token_ids: Iterable[int] = frozenset(), min_new_tokens: int = 0):
        self.sampling = sampling
        self.min_new_tokens = check_int("min_new_tokens", min_new_tokens, 0)
        self.stops = torch.tensor(sorted(stop_token_ids), dtype=torch.long, device=device)
        self.generator = None
        if sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.recent = None
        if sampling.penalizes:
            ids = torch.as_tensor(prompt_ids, dtype=torch.long)
            self.recent = (ids if ids.dim() == 2 else ids.reshape(1, -1))[:, -sampling.penalty_last_n :].to(device)
        self.chosen = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row of ``logits`` (B, vocab), as (B,) int64; it is remembered
        for the penalties of the next steps."""
        if self.recent is not None:
            logits = self.sampling.penalize(logits, self.recent)
        if self.chosen < self.min_new_tokens and len(self.stops):
            logits = logits.index_fill(-1, self.stops, float("-inf"))
        token = self.sampling.pick(logits, self.generator)
        if self.recent is not None:
            self.recent = torch.cat((self.recent, token[:, None]), dim=1)[:, -self.sampling.penalty_last_n :]
        self.chosen += 1
        return token

    def is_stop(self, token: torch.Tensor) -> torch.Tensor:
        """Which entries of ``token`` (B,) are stop tokens, as a (B,) bool tensor."""
        return torch.isin(token, self.stops)
