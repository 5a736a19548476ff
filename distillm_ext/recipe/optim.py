"""The student's optimizer and learning-rate schedule: AdamW over the trainable parameters, with
linear warm-up, then cosine or linear decay to 0, or a constant rate (train.schedule)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .config import TrainConfig


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def build_optimizer(student: nn.Module, train: TrainConfig, total_steps: int):
    """(AdamW, its LambdaLR schedule); step the schedule once after every optimizer step."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    factor = functools.partial(lr_factor, warmup_steps=train.warmup_steps, total_steps=total_steps,
                               schedule=train.schedule)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
