"""Learning-rate schedules as pure functions of progress (nothing to checkpoint)."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def scaled_lr(lr: float, batch_size: int, rule: str, reference_batch: int) -> float:
    """The base learning rate a stage uses. "linear" is Goyal et al.'s rule: lr is the
    rate at `reference_batch` and grows in proportion to the (global) batch size, for
    runs that grow the batch with the number of GPUs. "none" uses lr as given. The world
    size itself never enters: batch sizes are global, so adding ranks alone changes
    nothing but the speed."""
    return lr * batch_size / reference_batch if rule == "linear" else lr


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up from ~0 to base_lr, then cosine decay to 0; stepped per iteration."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def multistep(epoch: int, base_lr: float, milestones: Sequence[int], gamma: float) -> float:
    """lr * gamma^(number of milestones reached), with epochs counted from 0."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
