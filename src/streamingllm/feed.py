"""Feeding endless token streams through a model with a :class:`~streamingllm.cache.SinkCache`.

* :func:`prefill` reads a prompt of any length in chunks, evicting as it goes, so memory
  never exceeds the cache plus one chunk. ``exact=True`` gives every token exactly the
  attention it would get if the prompt were fed one token at a time (sinks + its own last
  ``window_size`` tokens, at the same positions); ``exact=False`` uses the model's plain
  causal mask inside a chunk, so a token may also see up to ``chunk_size - 1`` older window
  tokens, with the sinks one position further away per such token (cheaper; documented in
  docs/design.md).
* :func:`generate_tokens` yields new token ids one by one, chosen by a
  :class:`~streamingllm.sampling.TokenChooser` (greedy or sampled; :class:`Sampling` lives there too).
* :func:`generate` is ``model.generate`` with an exact prefill first: transformers' decoding
  loop, sampling options and outputs, for prompts of any length.
* :func:`decode_rows` advances several independent streams (each on its own cache) by one token
  in one batched forward: what a server does for its sessions at every step.
* :func:`token_logprobs` gives the log-probabilities of a chosen token and of the most likely ones.

All of them pass the cache's :meth:`~streamingllm.cache.SinkCache.position_ids`, which keep
the positions the model computes angles for small however long the stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .cache import SinkCache
from .checks import check_int
from .compat import cache_kwargs
from .compiled import DecodeStep
from .families import UnsupportedModelError
from .sampling import Sampling, TokenChooser


def _as_batch(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be 1D (tokens) or 2D (batch, tokens), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one token")
    return ids


def iter_chunks(
    model,
    cache: SinkCache,
    input_ids,
    chunk_size: int = 256,
    exact: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Run ``input_ids`` (B, T) through ``model`` in chunks, streaming them into ``cache``.

    Yields ``(start, logits)`` per chunk: ``logits`` (B, q, vocab) are the outputs for tokens
    ``start .. start + q - 1`` of ``input_ids``; the logits at token ``i`` predict token ``i + 1``.
    Memory stays bounded by the cache plus one chunk, however long the input.

    Args:
        model: a causal LM whose family ``cache`` was built for.
        cache: the :class:`SinkCache` to fill (it may already hold a stream).
        input_ids: token ids, shape (T,) or (B, T); equal-length streams, no padding.
        chunk_size: tokens per forward pass (>= 1). Peak memory grows with it.
        exact: banded attention inside each chunk, identical to token-by-token feeding.
            ALiBi models, and attention implementations without additive float masks
            (flex_attention), have no exact chunked form here and are fed one token at a time.
    """
    chunk_size = check_int("chunk_size", chunk_size, 1)
    ids = _as_batch(input_ids).to(model.device)
    if exact and not cache.exact_chunks:
        chunk_size = 1
    done, total = 0, ids.shape[1]
    pass_cache = cache_kwargs(model, cache)
    limit = getattr(cache, "chunk_limit", None)  # a memory cache looks up per chunk of at most this many queries
    while done < total:
        room = cache.max_cached_tokens + 1 - cache.seen_tokens  # chunks that evict nothing are exact already
        size = min(chunk_size, total - done)
        if limit is not None:
            size = min(size, limit)
        elif exact and room > 0:
            size = min(size, room)
        mask = cache.exact_chunk_mask(size, dtype=model.dtype, device=model.device) if exact else None
        if not exact:
            cache.allow_fast_chunk(size)
        with torch.no_grad():  # not around the yield: grad mode must not leak to the caller
            logits = model(input_ids=ids[:, done : done + size], attention_mask=mask, use_cache=True,
                           **_positions(cache, size, model.device), **pass_cache).logits
        yield done, logits
        done += size


@torch.no_grad()
def prefill(
    model,
    cache: SinkCache,
    input_ids,
    chunk_size: int = 256,
    exact: bool = True,
    return_all_logits: bool = False,
    progress=None,
) -> torch.Tensor:
    """Run ``input_ids`` (B, T) through ``model`` in chunks, streaming them into ``cache``.

    Args:
        model, cache, input_ids, chunk_size, exact: as for :func:`iter_chunks`.
        return_all_logits: return logits for every token (B, T, vocab) instead of the last (B, vocab).
        progress: optional callable ``progress(n_tokens_done)`` called after each chunk.

    Returns:
        The logits of the last token (B, vocab), or of all tokens with ``return_all_logits``.
    """
    outputs = []
    for start, logits in iter_chunks(model, cache, input_ids, chunk_size=chunk_size, exact=exact):
        outputs.append(logits if return_all_logits else logits[:, -1])
        if progress is not None:
            progress(start + logits.shape[1])
    return torch.cat(outputs, dim=1) if return_all_logits else outputs[-1]


@torch.no_grad()
def generate_tokens(
    model,
    cache: SinkCache,
    input_ids,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_token_ids: set[int] | frozenset[int] = frozenset(),
    chunk_size: int = 256,
    exact_prefill: bool = True,
    prefill_progress: Callable[[int], None] | None = None,
    min_new_tokens: int = 0,
    compile: str | bool | DecodeStep = "auto",
) -> Iterator[torch.Tensor]:
    """Prefill ``input_ids`` and yield up to ``max_new_tokens`` new tokens, one (B,) tensor per step.

    Memory stays bounded by the cache however many tokens are generated. Generation stops
    early when every row has produced a token in ``stop_token_ids``.

    Args:
        model, cache, input_ids, chunk_size: as for :func:`iter_chunks`.
        max_new_tokens: tokens to generate at most (>= 0).
        sampling: how each token is chosen (greedy by default).
        stop_token_ids: token ids that end a row's generation (the stop token is yielded).
        exact_prefill: exact banded attention inside prompt chunks (see :func:`prefill`).
        prefill_progress: ``progress(n_prompt_tokens_done)`` after each prompt chunk.
        min_new_tokens: the stop tokens are suppressed (their logits set to -inf) for this many
            tokens, so a reply is at least this long (>= 0; llama.cpp's way, instead of ignoring
            the end of turn and writing past it).
        compile: the decode steps once the cache is full: ``"auto"`` (compiled on CUDA, where it
            pays), ``"on"``, ``"off"``, or a :class:`~streamingllm.compiled.DecodeStep` (one that
            reports its warm-up, or is shared by several calls); see :mod:`streamingllm.compiled`.
    """
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
    min_new_tokens = check_int("min_new_tokens", min_new_tokens, 0)
    decode = compile if isinstance(compile, DecodeStep) else DecodeStep(model, compile)
    if max_new_tokens == 0:
        return
    ids = _as_batch(input_ids)
    choose = TokenChooser(sampling, ids, model.device, stop_token_ids, min_new_tokens)
    logits = prefill(model, cache, ids, chunk_size=chunk_size, exact=exact_prefill, progress=prefill_progress)
    step_ids = torch.empty((ids.shape[0], 1), dtype=torch.long, device=model.device)  # reused every step
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=model.device)
    for i in range(max_new_tokens):
        token = choose(logits)
        yield token
        if len(choose.stops):
            finished |= choose.is_stop(token)
            if bool(finished.all()):
                return
        if i + 1 == max_new_tokens:
            return
        step_ids[:, 0] = token
        logits = decode(step_ids, cache)[:, -1]


@torch.no_grad()
def decode_rows(model, caches: list[SinkCache], token_ids, decode: DecodeStep | None = None) -> torch.Tensor:
    """Feed ``token_ids[r]`` to the stream ``caches[r]``, for every r, and return the next-token
    logits (rows, vocab).

    The streams are independent (their own lengths, positions and cache sizes). Where the
    family's attention goes through the sink-aware interface (:attr:`SinkCache.can_stack`), all
    rows share one forward: each row is stored in and attends to its own cache only, at its own
    position (:meth:`SinkCache.stacked`), and gets the logits a forward of its own would give, to
    floating-point rounding. Otherwise the rows are run one after the other.

    Args:
        model: the causal LM the caches were built for.
        caches: one batch-1 :class:`SinkCache` per stream.
        token_ids: the next token of each stream, (rows,) int.
        decode: runs a single stream's step (compiled where it is: :class:`~streamingllm.compiled.DecodeStep`);
            None: an ordinary forward.
    """
    tokens = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1, 1).to(model.device)
    if tokens.shape[0] != len(caches) or not caches:
        raise ValueError(f"decode_rows: got {tokens.shape[0]} tokens for {len(caches)} caches; give one token per cache")
    if len(caches) == 1 and decode is not None:
        return decode(tokens, caches[0])[:, -1]
    if len(caches) == 1 or not all(c.can_stack for c in caches):
        return torch.cat([model(input_ids=tokens[r : r + 1], use_cache=True, **_positions(c, 1, model.device),
                                **cache_kwargs(model, c)).logits[:, -1] for r, c in enumerate(caches)])
    positions = [c.position_ids(1, model.device) for c in caches]
    kwargs = {} if positions[0] is None else {"position_ids": torch.cat(positions)}
    batch = SinkCache.stacked(caches)
    return model(input_ids=tokens, use_cache=True, **kwargs, **cache_kwargs(model, batch)).logits[:, -1]


def token_logprobs(logits: torch.Tensor, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under ``logits`` (vocab,), and the ``top`` most likely
    tokens with theirs (most likely first; ``top`` >= 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top) if top else None
    return float(logp[token]), ([] if best is None else list(zip(best.indices.tolist(), best.values.tolist())))


def _positions(cache: SinkCache, q: int, device) -> dict:
    """``{"position_ids": ...}`` for the next ``q`` tokens, or ``{}`` for families without positions."""
    pos = cache.position_ids(q, device)
    return {} if pos is None else {"position_ids": pos}


@torch.no_grad()
def generate(model, input_ids, cache: SinkCache, chunk_size: int = 256, exact_prefill: bool = True, progress=None,
             **generate_kwargs):
    """``model.generate(input_ids, cache=cache, **generate_kwargs)``, with the prompt prefilled exactly first.

    transformers' ``generate()`` feeds a prompt in one forward, which a sink cache can serve
    exactly only while it fits; this feeds all but the prompt's last token through
    :func:`prefill` (exact banded chunks, memory bounded by the cache plus one chunk), then hands
    over to ``generate()``, which feeds only the tokens the cache has not consumed. It is also
    the multi-turn pattern: pass the whole conversation so far and the same cache each turn.

    Args:
        model: a causal LM whose family ``cache`` was built for.
        input_ids: the whole conversation so far, (T,) or (B, T); its first
            ``cache.seen_tokens`` tokens are taken as already consumed. A left-padded batch
            (``attention_mask`` with zeros) goes to ``model.generate`` directly: the cache
            streams each row on its own, with exact bands (see :mod:`streamingllm.rows`).
        cache: the :class:`SinkCache` (it may already hold the start of the conversation).
        chunk_size: prompt tokens per forward pass (>= 1).
        exact_prefill: False feeds the prompt with the model's plain causal mask inside each
            chunk (cheaper; a token may see up to ``chunk_size - 1`` older tokens; see
            docs/design.md).
        progress: optional ``progress(n_tokens_done)`` after each prompt chunk.
        generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``, ...).

    Returns:
        What ``model.generate`` returns (the whole sequence, or its output object).
    """
    ids = _as_batch(input_ids).to(model.device)
    mask = generate_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):  # left padding: the cache streams each row itself
        return model.generate(ids, **cache_kwargs(model, cache), **generate_kwargs)
    seen = cache.seen_tokens
    if ids.shape[1] <= seen:
        raise ValueError(f"input_ids has {ids.shape[1]} tokens but the cache has consumed {seen}: "
                         "pass the whole conversation so far plus at least one new token")
    if cache.family.bias_from_seq_length and ids.shape[1] - 1 > cache.max_cached_tokens:  # before feeding anything
        raise UnsupportedModelError(
            f"{cache.family.name} sizes its ALiBi bias from get_seq_length(), so transformers' generate() cannot "
            "continue a stream once the cache has evicted; use streamingllm.generate_tokens or streamingllm.Session")
    if ids.shape[1] - seen > 1:
        prefill(model, cache, ids[:, seen:-1], chunk_size=chunk_size, exact=exact_prefill, progress=progress)
    return model.generate(ids, **cache_kwargs(model, cache), **generate_kwargs)
