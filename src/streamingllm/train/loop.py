"""The training loop: AdamW, warm-up and cosine decay, a progress bar, a log, a checkpoint.

:func:`train_variant` trains one variant and writes, in ``<out>/<variant>/``, an ordinary
transformers checkpoint (``config.json``, weights, the variant's tokenizer), ``train_log.csv``
(one row per step: tokens, loss, learning rate, tokens/s, and the validation loss every
``eval_every`` steps) and ``training.json`` (the configuration, the variant, times and final
losses). A folder whose ``training.json`` records the same configuration is reused, not retrained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..report import progress_bar, write_csv
from .data import SINK, Windows, variant_tokenizer
from .recipe import TrainConfig, Variant, autocast_dtype, build_model

LOG_COLUMNS = ("step", "tokens", "loss", "val_loss", "lr", "tokens_per_s", "elapsed_s")


@dataclass
class TrainResult:
    """What one variant's training gave.

    Attributes:
        variant: the variant's name.
        folder: its checkpoint folder.
        log: the ``train_log.csv`` rows.
        seconds: wall time of the training steps.
        reused: True when an earlier run's checkpoint was found and kept.
    """

    variant: str
    folder: Path
    log: list[dict]
    seconds: float
    reused: bool = False


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate at ``step`` (0-based): linear warm-up to the peak, then cosine decay to
    ``min_lr_ratio`` of it at the last step."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(1, config.steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return peak * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def inputs_and_labels(windows: torch.Tensor, sink_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs and labels for (batch, seq_len) text ``windows``: ``<sink>`` prepended when
    ``sink_id`` is given. Every variant is scored on the same targets, the window's tokens after
    its first (the sink and the first text token get the ignored label -100)."""
    if sink_id is not None:
        windows = torch.cat([torch.full_like(windows[:, :1], sink_id), windows], dim=1)
    labels = windows.clone()
    labels[:, : 1 + (sink_id is not None)] = -100
    return windows, labels


def loss_of(model, windows: torch.Tensor, sink_id: int | None, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Mean next-token loss (nats) of ``model`` on ``windows`` (see :func:`inputs_and_labels`)."""
    device = next(model.parameters()).device
    ids, labels = (t.to(device) for t in inputs_and_labels(windows, sink_id))
    ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        return model(input_ids=ids, labels=labels, use_cache=False).loss.float()


def optimizer_for(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95) with weight decay on matrices only (not norms or sink logits)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=config.learning_rate, betas=(0.9, 0.95))


def _record(config: TrainConfig, variant: Variant) -> dict:
    return {"variant": variant.name, "config": dataclasses.asdict(config)}


def finished(folder: Path, config: TrainConfig, variant: Variant) -> bool:
    """True when ``folder`` holds a finished run of ``variant`` with exactly ``config``."""
    meta = folder / "training.json"
    if not meta.is_file():
        return False
    saved = json.loads(meta.read_text())
    return {k: saved.get(k) for k in ("variant", "config")} == _record(config, variant)


def read_log(path: Path) -> list[dict]:
    """The rows of a ``train_log.csv`` (numbers as floats, empty cells as None)."""
    import csv

    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


def train_variant(variant: Variant, config: TrainConfig, tokenizer, train_ids: torch.Tensor,
                  held_out_ids: torch.Tensor, out: Path, *, progress: bool = True,
                  command: str | None = None) -> TrainResult:
    """Train ``variant`` from scratch and save it in ``out/<variant>/``.

    Args:
        variant: the variant to train.
        config: model and schedule (the same for every variant).
        tokenizer: the shared tokenizer (the variant's copy is saved with the checkpoint).
        train_ids: the training text's token ids (1-D).
        held_out_ids: the held-out text's token ids, for the validation loss.
        out: the run folder; the checkpoint goes in ``out/<variant>/``.
        progress: show a progress bar with the loss and tokens/s.
        command: the command line that started the run, recorded in ``training.json``.
    """
    folder = Path(out) / variant.name
    if finished(folder, config, variant):
        return TrainResult(variant.name, folder, read_log(folder / "train_log.csv"),
                           json.loads((folder / "training.json").read_text())["seconds"], reused=True)
    model = build_model(variant, config, tokenizer).train()
    sink_id = tokenizer.convert_tokens_to_ids(SINK) if variant.sink_token else None
    autocast = autocast_dtype(config)
    opt = optimizer_for(model, config)
    batches = Windows(train_ids, config.seq_len, seed=config.seed)
    val = Windows(held_out_ids, config.seq_len).evenly(config.eval_windows)
    log: list[dict] = []
    bar = progress_bar(config.steps * config.tokens_per_step, f"pretrain {variant.name}", enabled=progress)
    smooth = None
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, config)
            loss = loss_of(model, batches.batch(config.batch_size), sink_id, autocast)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{variant.name}: the loss is {loss.item()} at step {step}; lower "
                                         f"learning_rate ({config.learning_rate:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            dt = time.perf_counter() - t0
            smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
            row = {"step": step + 1, "tokens": (step + 1) * config.tokens_per_step, "loss": loss.item(),
                   "lr": opt.param_groups[0]["lr"], "tokens_per_s": config.tokens_per_step / dt,
                   "elapsed_s": time.perf_counter() - start}
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                row["val_loss"] = validation_loss(model, val, sink_id, autocast)
            log.append(row)
            bar.update(config.tokens_per_step)
            bar.set_postfix_str(f"loss {smooth:.3f}" + (f" val {row['val_loss']:.3f}" if "val_loss" in row else "")
                                + f" {row['tokens_per_s']:,.0f} tok/s", refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    save_checkpoint(model, variant_tokenizer(tokenizer, variant.sink_token), folder)
    write_csv(log, folder / "train_log.csv", LOG_COLUMNS)
    meta = {**_record(config, variant), "seconds": seconds, "tokens": config.steps * config.tokens_per_step,
            "parameters": sum(p.numel() for p in model.parameters()), "final_loss": smooth,
            "final_val_loss": log[-1]["val_loss"], "command": command}
    (folder / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    return TrainResult(variant.name, folder, log, seconds)


@torch.no_grad()
def validation_loss(model, windows: torch.Tensor, sink_id: int | None, autocast=None) -> float:
    """Mean loss on the fixed held-out ``windows``, in eval mode (the model is put back in training)."""
    model.eval()
    try:
        return float(loss_of(model, windows, sink_id, autocast))
    finally:
        model.train()


def save_checkpoint(model, tokenizer, folder: Path) -> Path:
    """Save ``model`` (float32, eval mode) and ``tokenizer`` as a transformers checkpoint in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
