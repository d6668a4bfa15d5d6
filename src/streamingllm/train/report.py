"""Training curves of a pre-training run: one CSV and one PNG for all its variants."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..report import pyplot, save_figure, write_csv
from .loop import TrainResult
from .recipe import TrainConfig

CURVE_COLUMNS = ("variant", "step", "tokens", "loss", "val_loss", "lr", "tokens_per_s")


def write_losses(results: Sequence[TrainResult], path) -> Path:
    """Every variant's per-step log in one CSV (``variant`` first)."""
    rows = [{"variant": r.variant, **row} for r in results for row in r.log]
    return write_csv(rows, path, CURVE_COLUMNS)


def smoothed(values: Sequence[float], span: int) -> np.ndarray:
    """Trailing mean over up to ``span`` values (the first values average what there is)."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    n = np.minimum(np.arange(1, len(v) + 1), span)
    return (c[1:] - c[np.arange(1, len(v) + 1) - n]) / n


def plot_losses(results: Sequence[TrainResult], path, config: TrainConfig) -> Path:
    """Training loss (trailing mean over 25 steps) and validation loss against tokens seen."""
    plt = pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in results:
        tokens = np.array([row["tokens"] for row in r.log]) / 1e6
        line, = ax_train.plot(tokens, smoothed([row["loss"] for row in r.log], 25), lw=1.2, label=r.variant)
        val = [(row["tokens"] / 1e6, row["val_loss"]) for row in r.log if row.get("val_loss") is not None]
        if val:
            ax_val.plot(*zip(*val), marker="o", ms=3, lw=1.2, color=line.get_color(), label=r.variant)
    ax_train.set(xlabel="tokens seen (millions)", ylabel="loss (nats/token)", title="training (mean of 25 steps)")
    ax_val.set(xlabel="tokens seen (millions)", title=f"held-out {config.held_out}")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    params = (f"{config.num_layers} layers x {config.hidden_size}, {config.seq_len}-token samples, "
              f"batch {config.batch_size}, {config.steps} steps")
    return save_figure(fig, path, title=f"pre-training from scratch on Austen: {params}")
