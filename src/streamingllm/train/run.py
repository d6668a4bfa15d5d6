"""One pre-training run: the shared data, then every variant in turn."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import resolve_device
from .data import austen_split, train_tokenizer
from .loop import TrainResult, train_variant
from .recipe import TrainConfig, Variant


@dataclass
class PretrainData:
    """What every variant of a run shares.

    Attributes:
        tokenizer: the BPE tokenizer trained on the training text (no special tokens added).
        train_ids: the training text's token ids (1-D long).
        held_out_ids: the held-out novel's token ids (1-D long).
        held_out_text: the held-out novel's text.
    """

    tokenizer: object
    train_ids: torch.Tensor
    held_out_ids: torch.Tensor
    held_out_text: str


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=torch.long)


def prepare_data(config: TrainConfig, out: Path, texts: tuple[str, str] | None = None) -> PretrainData:
    """The tokenizer (trained once per run folder and kept in ``out/tokenizer``) and the token ids.

    Args:
        config: the run's configuration (``vocab_size``, ``held_out``).
        out: the run folder.
        texts: ``(training text, held-out text)``; Austen split by ``config.held_out`` when None.
    """
    from transformers import PreTrainedTokenizerFast

    train_text, held_out_text = texts if texts is not None else austen_split(config.held_out)
    folder = Path(out) / "tokenizer"
    meta = folder / "vocab_size.json"
    if meta.is_file() and json.loads(meta.read_text()) == {"vocab_size": config.vocab_size,
                                                             "held_out": config.held_out}:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    else:
        tokenizer = train_tokenizer(train_text, config.vocab_size)
        tokenizer.save_pretrained(folder)
        meta.write_text(json.dumps({"vocab_size": config.vocab_size, "held_out": config.held_out}) + "\n")
    return PretrainData(tokenizer, _ids(tokenizer, train_text), _ids(tokenizer, held_out_text), held_out_text)


def pretrain(variants: Sequence[Variant], config: TrainConfig, out: Path, *, data: PretrainData | None = None,
             progress: bool = True, command: str | None = None,
             on_done: Callable[[TrainResult], None] | None = None) -> list[TrainResult]:
    """Train each of ``variants`` with ``config`` into ``out/<variant>/`` (see
    :func:`~streamingllm.train.loop.train_variant`); ``on_done`` is called after each."""
    resolve_device(config.device)  # before the tokenizer is trained
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = data or prepare_data(config, out)
    results = []
    for variant in variants:
        result = train_variant(variant, config, data.tokenizer, data.train_ids, data.held_out_ids, out,
                               progress=progress, command=command)
        results.append(result)
        if on_done:
            on_done(result)
    return results
