"""Learning-rate schedules with warmup: cosine, linear, constant."""

from __future__ import annotations

import math

import torch


def warmup_steps_for(total: int, warmup_steps: int | None, warmup_ratio: float | None) -> int:
    if warmup_steps is not None:
        return warmup_steps
    if warmup_ratio is not None:
        return int(math.ceil(total * warmup_ratio))
    return 0


def lr_lambda(kind: str, total: int, warmup: int, min_ratio: float = 0.0):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total: int, warmup: int, min_ratio: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, total, warmup, min_ratio))
