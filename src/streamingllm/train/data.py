"""Training text, tokenizer and batches for pre-training small models from scratch, offline.

* :func:`austen_split` -- Austen's novels minus one held out for evaluation (Persuasion by default).
* :func:`train_tokenizer` -- a byte-level BPE trained on the training text only, with the special
  tokens every variant shares (``<|endoftext|>`` and the dedicated ``<sink>``), so the vocabulary
  is identical across variants; :func:`variant_tokenizer` makes the sink-token variant's copy,
  which prepends ``<sink>`` to every text as its BOS.
* :class:`Windows` -- random windows of a token stream, the same ones for every variant of a seed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..checks import ArgumentError, check_choice, check_int
from ..evals.corpus import AUSTEN_NOVELS, austen_text

EOS = "<|endoftext|>"
SINK = "<sink>"
SPECIAL_TOKENS = (EOS, SINK)


def austen_split(held_out: str = "persuasion") -> tuple[str, str]:
    """``(training text, held-out text)``: the novels other than ``held_out``, and ``held_out``.

    Args:
        held_out: the novel kept out of training (a name from
            :data:`~streamingllm.evals.corpus.AUSTEN_NOVELS`).
    """
    held_out = check_choice("held_out", held_out, AUSTEN_NOVELS)
    train = [n for n in AUSTEN_NOVELS if n != held_out]
    return austen_text(novels=train), austen_text(novels=held_out)


def train_tokenizer(text: str, vocab_size: int = 8192):
    """A byte-level BPE tokenizer of ``vocab_size`` entries (special tokens included) trained on
    ``text``, as a :class:`~transformers.PreTrainedTokenizerFast` that adds no special tokens.

    Args:
        text: the training text (never the held-out text).
        vocab_size: entries in the vocabulary, >= 300 (the 256 bytes, the special tokens, merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vocab_size = check_int("vocab_size", vocab_size, 300)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    paragraphs = (p for p in text.split("\n\n") if p.strip())
    bpe.train_from_iterator(paragraphs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS, model_max_length=1 << 30)


def variant_tokenizer(tokenizer, sink_token: bool):
    """The tokenizer a variant ships: ``tokenizer`` itself, or (``sink_token``) a copy whose BOS is
    ``<sink>``, prepended to every text it encodes with special tokens, as in training."""
    if not sink_token:
        return tokenizer
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    sink_id = tok.convert_tokens_to_ids(SINK)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SINK} $A", pair=f"{SINK} $A $B", special_tokens=[(SINK, sink_id)])
    tok.bos_token = SINK
    return tok


@dataclass
class Windows:
    """Random windows of ``seq_len`` tokens of ``ids``, drawn with their own generator so the
    sequence of batches depends only on ``seed``.

    Attributes:
        ids: the token stream (1-D long tensor).
        seq_len: tokens per window.
        seed: seed of the window starts.
    """

    ids: torch.Tensor
    seq_len: int
    seed: int = 0

    def __post_init__(self):
        self.seq_len = check_int("seq_len", self.seq_len, 2)
        if self.ids.numel() <= self.seq_len:
            raise ArgumentError("seq_len", f"must be below the text's {self.ids.numel()} tokens", self.seq_len)
        self._gen = torch.Generator().manual_seed(self.seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        """(batch_size, seq_len) windows starting at uniformly drawn token offsets."""
        starts = torch.randint(0, self.ids.numel() - self.seq_len, (batch_size,), generator=self._gen)
        return torch.stack([self.ids[s:s + self.seq_len] for s in starts.tolist()])

    def evenly(self, count: int) -> torch.Tensor:
        """(count, seq_len) windows at evenly spaced offsets (a fixed validation set)."""
        last = self.ids.numel() - self.seq_len
        starts = torch.linspace(0, last, count).long().tolist()
        return torch.stack([self.ids[s:s + self.seq_len] for s in starts])
