"""Process reward model: is each reasoning step right? Labels sit on the step-separator tokens.

Design (the common one: trl's PRMTrainer, Qwen2.5-Math-PRM): a 2-class token-classification head
`model.score` = Linear(hidden, 2) on the decoder's final hidden states, read only where the row has a label. The
data marks the last token of each step's separator with 1 (step correct) or 0 (step wrong), -100 elsewhere; labels
are NOT shifted (the head classifies the separator token itself, which has seen the whole step). Loss: cross-entropy
summed over labelled tokens, normalised by the labelled tokens of the whole optimizer step. At inference the step
reward is softmax(score(h))[1] at each separator; the solution's score is usually the minimum (or the last) of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import apply_head, attach_score_head
from .sequences import as_floats, forward_hidden


class ProcessRewardModel:
    name = "prm"
    data_kind = "prm"
    modules_to_save = ("score",)
    task_type = "TOKEN_CLS"

    def __init__(self, seed: int = 42):
        self.seed = seed

    @classmethod
    def from_config(cls, cfg: Any) -> ProcessRewardModel:
        return cls(cfg.seed)

    def prepare_model(self, model: nn.Module, cfg: Any = None) -> None:
        attach_score_head(model, 2, bias=True, seed=self.seed)

    def setup(self, model: nn.Module, cfg: Any = None, prepared: Any = None) -> dict[str, Any]:
        attach_score_head(model, 2, bias=True, seed=self.seed)
        return {}

    def count(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != -100).sum())

    def loss(self, model: nn.Module, batch: dict[str, Any], normalizer: int) -> tuple[torch.Tensor, dict[str, float]]:
        if getattr(model, "score", None) is None:
            attach_score_head(model, 2, bias=True, seed=self.seed)
        hidden = forward_hidden(model, batch)
        labels = batch["labels"].reshape(-1).to(hidden.device)
        keep = (labels != -100).nonzero().squeeze(-1)
        y = labels[keep]
        if y.numel() and bool(((y != 0) & (y != 1)).any()):
            bad = sorted(set(y[(y != 0) & (y != 1)].tolist()))[:5]
            raise ValueError(f"prm rows must label step separators with 0 (wrong) or 1 (right), -100 elsewhere; "
                             f"found {bad} (rows formatted for SFT instead of `type: prm`?)")
        logits = apply_head(model.score, hidden[keep])
        total = F.cross_entropy(logits, y, reduction="sum") if y.numel() else logits.sum() * 0.0 + hidden.sum() * 0.0
        loss = total / max(normalizer, 1)
        metrics: dict[str, Any] = {}
        if y.numel():
            pred = logits.detach().argmax(-1)
            metrics["accuracy"] = (pred == y).float().mean()
            metrics["step_reward/mean"] = logits.detach().softmax(-1)[:, 1].mean()
            metrics["steps/correct_fraction"] = y.float().mean()
            good, bad = y == 1, y == 0
            if bool(good.any()):
                metrics["accuracy/correct_steps"] = (pred[good] == 1).float().mean()
            if bool(bad.any()):
                metrics["accuracy/wrong_steps"] = (pred[bad] == 0).float().mean()
        return loss, as_floats(metrics)
