"""Seeing the attention sinks: per-layer attention maps and sink statistics (the paper's Figure 2).

:func:`capture` runs a text through the model once with eager attention (forced for the
capture, then restored) and returns every layer's attention probabilities. From them:

* :func:`head_mean` gives the per-layer maps averaged over heads (Figure 2 shows them for the
  first 16 tokens of a sentence: past the first two layers, most of each row's mass goes to
  the first token);
* :func:`sink_statistics` gives, for each layer, the share of attention mass on the first ``k``
  tokens and on the first token alone, averaged over heads and over the queries that could look
  elsewhere, beside what uniform attention would give the first token.

No I/O here: CSV, tables and figures are in :mod:`streamingllm.evals.recall_report`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..attention import RETURNS_PROBABILITIES
from ..checks import check_int


@torch.no_grad()
def capture(model, input_ids) -> list[torch.Tensor]:
    """Every layer's attention probabilities over ``input_ids`` (T,) or (1, T): a list of
    (heads, T, T) float32 tensors, causal, rows summing to 1 (to less with a softmax sink, which
    takes the rest). The model attends eagerly for the capture (the only implementation that
    returns probabilities) and gets its own implementation back afterwards; an implementation that
    returns probabilities itself (:data:`~streamingllm.attention.RETURNS_PROBABILITIES`) is kept."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(model.device)
    if ids.shape[1] < 2:
        raise ValueError(f"the text has {ids.shape[1]} token(s); attention maps need at least 2")
    previous = getattr(model.config, "_attn_implementation", None)
    switch = previous not in RETURNS_PROBABILITIES  # a softmax-sink model keeps its own attention
    if switch:
        _set_attention(model, "eager")
    try:
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        if switch and previous is not None:
            _set_attention(model, previous)
    if not out.attentions or out.attentions[0] is None:
        raise ValueError(f"{type(model).__name__} returned no attention probabilities")
    return [a[0].float().cpu() for a in out.attentions]


def _set_attention(model, implementation: str) -> None:
    """Switch ``model``'s attention; models whose attention code is their own (Falcon) do not take
    ``set_attn_implementation`` but read the config's choice at every forward."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "does not support setting its attention implementation dynamically"
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, NotImplementedError):
        pass
    finally:
        logging.set_verbosity(verbosity)
    if getattr(model.config, "_attn_implementation", None) != implementation:
        model.config._attn_implementation = implementation


def head_mean(attentions: list[torch.Tensor]) -> np.ndarray:
    """(layers, T, T): each layer's map averaged over its heads."""
    return np.stack([a.mean(0).numpy() for a in attentions])


@dataclass(frozen=True)
class SinkStats:
    """Sink statistics of one model over one text, per layer.

    Attributes:
        label: the model's name in tables and plots.
        k: how many first tokens count as the sinks.
        sink_share: (layers,) mean attention mass on the first ``k`` tokens, over heads and the
            queries at positions >= ``k`` (those that could attend elsewhere).
        first_share: (layers,) mean mass on the first token, over heads and the same queries
            (>= ``k``), so it never exceeds ``sink_share``.
        uniform_first: what uniform causal attention gives the first token over the same queries
            (mean of 1 / (q + 1)): the baseline a sink stands out from.
        tokens: the text's length (tokens).
        softmax_sink_share: (layers,) mean mass the softmax's own sink took (what the rows miss of
            1), over heads and the same queries: zero for a plain softmax, the "attend to nothing" share
            of SoftMax1 and learned sink logits (:mod:`streamingllm.sink_llama`).
        layer_types: each layer's attention type (``config.layer_types``: ``"full_attention"`` or
            ``"sliding_attention"``) for hybrid models, else None. A sliding layer sees the first
            token only while the query is within its window: keep the text that short to compare types.
    """

    label: str
    k: int
    sink_share: np.ndarray
    first_share: np.ndarray
    uniform_first: float
    tokens: int
    softmax_sink_share: np.ndarray | None = None
    layer_types: tuple[str, ...] | None = None

    def by_type(self) -> dict[str, dict[str, float]]:
        """Per layer type: its layers' count, and their mean ``sink_share`` and ``first_share``
        (one type, ``"all"``, when the model does not name them)."""
        types = self.layer_types or ("all",) * len(self.sink_share)
        out = {}
        for t in dict.fromkeys(types):
            pick = np.array([x == t for x in types])
            out[t] = {"layers": int(pick.sum()), "sink_share": float(self.sink_share[pick].mean()),
                      "first_share": float(self.first_share[pick].mean())}
        return out


def layer_types(model) -> tuple[str, ...] | None:
    """``model``'s per-layer attention types when it names them with more than one type, else None."""
    from ..compat import text_config

    types = getattr(text_config(model.config), "layer_types", None)
    return tuple(types) if types and len(set(types)) > 1 else None


def sink_statistics(attentions: list[torch.Tensor], k: int = 4, label: str = "",
                    layer_types: tuple[str, ...] | None = None) -> SinkStats:
    """:class:`SinkStats` of captured ``attentions`` (see :func:`capture`), for the first ``k`` tokens;
    ``layer_types``: each layer's attention type, when the model has several (:func:`layer_types`)."""
    T = attentions[0].shape[-1]
    k = check_int("k", k, 1, T - 1)
    # one set of queries for every number: those at positions >= k, which could attend past the first k
    sink = np.array([float(a[:, k:, :k].sum(-1).mean()) for a in attentions])
    first = np.array([float(a[:, k:, 0].mean()) for a in attentions])
    uniform = float(np.mean(1.0 / np.arange(k + 1, T + 1)))
    virtual = np.array([float(1.0 - a[:, k:, :].sum(-1).mean()) for a in attentions]).clip(min=0.0)
    return SinkStats(label, k, sink, first, uniform, T, virtual, None if layer_types is None else tuple(layer_types))
