"""Rotating cached keys by integer position differences (RoPE, "rotate_half" layout, optionally partial).

A RoPE query-key score depends only on the difference of the two rotation angles, so a key
cached at one position is moved to another by rotating it by the difference. Angles are computed
in float64 from integer differences, and the rotation itself runs in at least float32 (bf16 and
fp16 keys are rotated in float32 and rounded once), so moving a key never accumulates error.
"""

from __future__ import annotations

import torch


#: Rows of the per-device table of single rotations (deltas 0 .. TABLE_ROWS - 1), see :meth:`Rotator.cos_sin`.
TABLE_ROWS = 8192


class Rotator:
    """Rotates cached keys by integer position differences.

    Args:
        inv_freq: the model's rotary inverse frequencies (radians per position), length
            ``rot_dim / 2``; the first ``rot_dim`` channels of each head are rotated.
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq64 = inv_freq.detach().to(torch.float64).cpu()
        self.half = self.inv_freq64.numel()
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _angles(self, deltas, repeats: int = 1) -> torch.Tensor:
        """``delta * inv_freq`` in float64, each delta's row repeated ``repeats`` times."""
        angles = torch.as_tensor(deltas, dtype=torch.float64)[:, None] * self.inv_freq64[None, :]
        return angles.repeat_interleave(repeats, dim=0)

    def cos_sin(self, deltas: tuple[int, ...], device, dtype, repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of ``delta * inv_freq``, each delta repeated ``repeats`` times: (len * repeats, half).

        Angles are computed in float64 from the integer deltas, then cast. A single delta in
        ``0 .. TABLE_ROWS - 1`` (a decode step's sink rotation) is a row of a table computed once
        per device and dtype, so a step does no host math and no host-to-device copy; other
        results are memoised, so all layers of one step share one computation.
        """
        if len(deltas) == 1 and repeats == 1 and 0 <= deltas[0] < TABLE_ROWS:
            table = self._tables.get((device, dtype))
            if table is None:
                angles = self._angles(range(TABLE_ROWS))
                table = self._tables[(device, dtype)] = (angles.cos().to(device=device, dtype=dtype),
                                                         angles.sin().to(device=device, dtype=dtype))
            return table[0][deltas[0] : deltas[0] + 1], table[1][deltas[0] : deltas[0] + 1]
        key = (deltas, repeats, device, dtype)
        hit = self._memo.get(key)
        if hit is None:
            angles = self._angles(deltas, repeats)
            hit = (angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype))
            if len(self._memo) > 64:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None):
        """Rotate ``x`` (..., T, head_dim) by angles with cos/sin broadcastable to (..., T, half).

        Writes into ``out`` (which may be ``x`` itself) when given, else into a new tensor.
        Channels past ``2 * half`` (partial rotary) are copied unchanged.
        """
        h = self.half
        x1, x2 = x[..., :h].to(cos.dtype), x[..., h : 2 * h].to(cos.dtype)
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        if out is None:
            out = torch.empty_like(x)
        # (the results are rounded to out's dtype once, by the copies below)
        if out is not x and x.shape[-1] > 2 * h:
            out[..., 2 * h :].copy_(x[..., 2 * h :])
        out[..., :h].copy_(r1)
        out[..., h : 2 * h].copy_(r2)
        return out

    def rotate_by(self, x: torch.Tensor, deltas: tuple[int, ...], repeats: int = 1, out: torch.Tensor | None = None):
        """Rotate ``x`` (..., T, head_dim) by ``deltas`` positions: one delta for all of T, or one per
        group of ``repeats`` tokens (``len(deltas) * repeats == T``)."""
        cos, sin = self.cos_sin(deltas, x.device, compute_dtype(x.dtype), repeats)
        return self.rotate(x, cos, sin, out=out)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rotations of ``dtype`` keys run in: float32 for 16-bit floats, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
