"""The training loop, optimizer, schedule, checkpoints, metrics and distribution."""

from .loop import Trainer, train

__all__ = ["Trainer", "train"]
