"""A memory of evicted tokens, in blocks (InfLLM, Xiao et al., NeurIPS 2024, arXiv 2402.04617).

* :class:`BlockMemory` -- the settings: block size, blocks retrieved, representative keys per block,
  queries per lookup, and where blocks live (CPU memory, an optional bound, an optional spill to disk).
* :class:`BlockStore` -- one layer's blocks: their keys (stored *without* rotation) and values off the
  accelerator, and one summary per block for lookup, and the lookup itself.

A block's summary is the sum of its representative keys, per key/value head: InfLLM scores a block
for a chunk of queries as ``sum_i sum_j q_i . r_j`` over the chunk's queries ``q_i`` and the block's
representative keys ``r_j``, which is ``(sum_i q_i) . (sum_j r_j)`` -- one dot product per block and
head. The representative keys are the block's tokens that received the most attention while they
were in the window (per key/value head), as in the paper. See docs/design.md ("A memory of evicted
blocks") for every choice and where it departs from the paper.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import ArgumentError, check_int


@dataclass(frozen=True)
class BlockMemory:
    """How a :class:`~streamingllm.cache.MemoryCache` remembers what leaves its window.

    Args:
        block_size: tokens per block (>= 1). Evicted tokens gather in a partial block (attended
            whole, beside the retrieved blocks) until it is full, then it becomes a block.
        top_k: blocks retrieved for each chunk of queries (>= 0; 0 keeps only the partial block).
        repr_keys: representative keys per block and key/value head (1 .. block_size).
        chunk_size: the most queries one lookup serves (tokens, >= 1): a forward of more tokens
            is refused once the cache evicts (:func:`~streamingllm.feed.iter_chunks` and the
            library's loops cut prompts to it).
        lookup_every: forwards between lookups (>= 1): 1 looks up for every chunk and every decoded
            token; ``n`` keeps the blocks a lookup chose (and their fetched keys and values) for the
            next ``n - 1`` forwards, the partial block always current.
        max_cpu_blocks: the most blocks kept in CPU memory per layer (None: no bound). Past it the
            oldest resident blocks go to ``spill_dir``, or are forgotten when there is none.
        spill_dir: a directory for blocks past ``max_cpu_blocks`` (one file per block; a private
            temporary directory under it, removed with the cache). None: no spill.
    """

    block_size: int = 128
    top_k: int = 4
    repr_keys: int = 4
    chunk_size: int = 32
    lookup_every: int = 1
    max_cpu_blocks: int | None = None
    spill_dir: str | None = None

    def __post_init__(self):
        check_int("block_size", self.block_size, 1)
        check_int("top_k", self.top_k, 0)
        check_int("repr_keys", self.repr_keys, 1)
        if self.repr_keys > self.block_size:
            raise ArgumentError("repr_keys", f"must be at most block_size ({self.block_size}): a block's keys",
                                self.repr_keys, mentions=("block_size",))
        check_int("chunk_size", self.chunk_size, 1)
        check_int("lookup_every", self.lookup_every, 1)
        if self.max_cpu_blocks is not None:
            check_int("max_cpu_blocks", self.max_cpu_blocks, 1)
        if self.spill_dir is not None and self.max_cpu_blocks is None:
            raise ArgumentError("spill_dir", "needs max_cpu_blocks (the blocks kept in memory before spilling)",
                                self.spill_dir, mentions=("max_cpu_blocks",))

    @property
    def retrieved_tokens(self) -> int:
        """The most memory tokens one forward attends to: the retrieved blocks and a partial block."""
        return self.top_k * self.block_size + self.block_size - 1

    def label(self) -> str:
        """Short text for tables: ``k4x128`` (``k4x128/4`` when looking up every 4 forwards)."""
        return f"k{self.top_k}x{self.block_size}" + (f"/{self.lookup_every}" if self.lookup_every > 1 else "")

    @classmethod
    def from_label(cls, label: str) -> BlockMemory:
        """The settings a :meth:`label` names (``k4x128``, ``k4x128/4``); the ones it does not name
        (``repr_keys``, ``chunk_size``, the store's bound) take their defaults."""
        match = re.fullmatch(r"k(\d+)x(\d+)(?:/(\d+))?", label)
        if match is None:
            raise ArgumentError("label", "must read k<top_k>x<block_size>[/<lookup_every>], e.g. k4x128/4", label)
        top_k, block_size, every = match.groups()
        return cls(block_size=int(block_size), top_k=int(top_k), lookup_every=int(every or 1),
                   repr_keys=min(cls.repr_keys, int(block_size)))


class BlockStore:
    """One layer's blocks, off the accelerator.

    Args:
        memory: the settings.
        device: where blocks are kept (the CPU unless asked otherwise).
    """

    def __init__(self, memory: BlockMemory, device: torch.device | str = "cpu"):
        self.memory, self.device = memory, torch.device(device)
        self.keys: list[torch.Tensor | None] = []  # per block (kv_heads, B, head_dim), unrotated; None: not resident
        self.values: list[torch.Tensor | None] = []
        self.spilled: dict[int, Path] = {}
        self.forgotten: set[int] = set()
        self._summary: torch.Tensor | None = None  # (capacity, kv_heads, head_dim) float32; rows < len(self)
        self._resident: list[int] = []  # resident blocks, oldest first
        self._dir: tempfile.TemporaryDirectory | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def summaries(self) -> torch.Tensor:
        """(blocks, kv_heads, head_dim): each block's summed representative keys."""
        return self._summary[: len(self)]

    def add(self, keys: torch.Tensor, values: torch.Tensor, summary: torch.Tensor, resident: bool = True) -> None:
        """Add a block: ``keys``/``values`` (kv_heads, B, head_dim), unrotated keys; ``summary``
        (kv_heads, head_dim). ``resident`` False: its summary only (a forgotten block restored)."""
        n = len(self)
        if self._summary is None or n == self._summary.shape[0]:
            grown = torch.zeros((max(16, 2 * n), *summary.shape), dtype=torch.float32, device=self.device)
            if self._summary is not None:
                grown[:n].copy_(self._summary)
            self._summary = grown
        self._summary[n].copy_(summary)
        if not resident:
            self.keys.append(None)
            self.values.append(None)
            return
        self.keys.append(keys.to(self.device))
        self.values.append(values.to(self.device))
        self._resident.append(n)
        bound = self.memory.max_cpu_blocks
        while bound is not None and len(self._resident) > bound:
            self._evict(self._resident.pop(0))

    def _evict(self, block: int) -> None:
        """Move a block out of memory: to the spill directory, or forget it."""
        if self.memory.spill_dir is not None:
            if self._dir is None:
                os.makedirs(self.memory.spill_dir, exist_ok=True)
                self._dir = tempfile.TemporaryDirectory(prefix="streamingllm-blocks-", dir=self.memory.spill_dir)
            path = Path(self._dir.name) / f"{block}.pt"
            torch.save({"keys": self.keys[block], "values": self.values[block]}, path)
            self.spilled[block] = path
        else:
            self.forgotten.add(block)
        self.keys[block] = self.values[block] = None

    def lookup(self, query_sum: torch.Tensor, k: int | None = None) -> list[int]:
        """The ``k`` (default ``top_k``) blocks with the highest scores ``sum_h query_sum[h] .
        summary[h]`` (forgotten blocks excluded), in stream order.

        Args:
            query_sum: (kv_heads, head_dim): the chunk's queries summed over the queries and the
                query heads of each key/value head, in the frame of the unrotated keys.
        """
        k = self.memory.top_k if k is None else k
        n = len(self) - len(self.forgotten)
        if not k or not n:
            return []
        scores = torch.einsum("bhd,hd->b", self.summaries, query_sum.to(self.device, torch.float32))
        if self.forgotten:
            scores[list(self.forgotten)] = -torch.inf
        return sorted(torch.topk(scores, min(k, n)).indices.tolist())

    def fetch(self, blocks: list[int], device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' keys and values, concatenated in the order given: (1, kv_heads, len * B, head_dim)."""
        keys, values = [], []
        for b in blocks:
            if self.keys[b] is None:
                saved = torch.load(self.spilled[b], mmap=True, weights_only=True)
                keys.append(saved["keys"])
                values.append(saved["values"])
            else:
                keys.append(self.keys[b])
                values.append(self.values[b])
        k = torch.cat(keys, dim=1)[None].to(device=device, dtype=dtype)
        v = torch.cat(values, dim=1)[None].to(device=device)
        return k, v

    def resident_bytes(self) -> int:
        """Bytes of the blocks kept in memory, summaries included."""
        held = sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
        return held + (0 if self._summary is None else self.summaries.numel() * 4)

    def spilled_bytes(self) -> int:
        """Bytes of the blocks on disk."""
        return sum(p.stat().st_size for p in self.spilled.values())

    def state(self) -> dict:
        """The blocks, for a saved state: ``blocks`` (per block its keys and values, None when
        forgotten) and ``summaries``. A block is never changed once written, so the state shares
        the resident blocks' tensors (on the CPU) rather than copying them; spilled blocks are
        mapped from their files, read when the state is written."""
        blocks = []
        for b in range(len(self)):
            if b in self.forgotten:
                blocks.append(None)
            elif self.keys[b] is not None:
                blocks.append((self.keys[b].cpu(), self.values[b].cpu()))
            else:
                saved = torch.load(self.spilled[b], mmap=True, weights_only=True)
                blocks.append((saved["keys"], saved["values"]))
        return {"blocks": blocks, "summaries": self.summaries.cpu().clone() if len(self) else None}

    def restore(self, state: dict) -> None:
        """Put back the blocks of :meth:`state` (the store must be empty)."""
        for i, block in enumerate(state["blocks"]):
            if block is None:  # forgotten: its summary only, never retrieved
                self.add(torch.zeros(0), torch.zeros(0), state["summaries"][i], resident=False)
                self.forgotten.add(i)
            else:
                self.add(block[0], block[1], state["summaries"][i])

    def close(self) -> None:
        """Remove the spill directory."""
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
