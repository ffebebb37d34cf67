"""Pairwise (Bradley-Terry) reward model: a scalar head on the decoder, read at each sequence's last token.

Per pair, with r = score(h_last):  L = -log s(r_w - r_l - margin) + c (r_w + r_l)^2

`margin` is the optional per-row field of the preference data (Llama 2's margin loss); c is
`rm_center_rewards_coefficient` (Eisenstein et al., 2023: keeps rewards centred on 0; trl's center_rewards_coefficient).
The last token should be the end-of-turn / EOS token, which the preference formatter appends.

The head is `model.score` = Linear(hidden, 1, bias=False) (heads.py). It must be trainable and saved: the method
declares `modules_to_save = ("score",)`; with LoRA it is saved with the adapter (PEFT's modules_to_save), in full
fine-tuning it is part of the model's state dict.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import apply_head, attach_score_head
from .sequences import as_floats, forward_hidden, last_token_index


def reward_pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float | None = None) -> torch.Tensor:
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    out = -F.logsigmoid(diff)
    if center_coefficient:
        out = out + center_coefficient * (chosen + rejected) ** 2
    return out


def sequence_scores(model: nn.Module, batch: dict[str, Any], num_seqs: int) -> torch.Tensor:
    """Scalar reward of every sequence of the flat batch [S] (float32)."""
    hidden = forward_hidden(model, batch)
    idx = last_token_index(batch["seq_index"].to(hidden.device), num_seqs)
    return apply_head(model.score, hidden[idx]).squeeze(-1)


class RewardModel:
    name = "rm"
    data_kind = "preference"
    modules_to_save = ("score",)
    task_type = "SEQ_CLS"

    def __init__(self, center_coefficient: float | None = None, seed: int = 42):
        self.center_coefficient = center_coefficient
        self.seed = seed

    @classmethod
    def from_config(cls, cfg: Any) -> RewardModel:
        return cls(cfg.rm_center_rewards_coefficient, cfg.seed)

    def prepare_model(self, model: nn.Module, cfg: Any = None) -> None:
        """Attach the score head (call right after loading, before adapters and sharding)."""
        attach_score_head(model, 1, bias=False, seed=self.seed)

    def setup(self, model: nn.Module, cfg: Any = None, prepared: Any = None) -> dict[str, Any]:
        attach_score_head(model, 1, bias=False, seed=self.seed)
        return {}

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["num_pairs"])

    def loss(self, model: nn.Module, batch: dict[str, Any], normalizer: int) -> tuple[torch.Tensor, dict[str, float]]:
        p = int(batch["num_pairs"])
        if getattr(model, "score", None) is None:
            attach_score_head(model, 1, bias=False, seed=self.seed)
        scores = sequence_scores(model, batch, 2 * p)
        chosen, rejected = scores[:p], scores[p:]
        margin = batch.get("margin")
        if margin is not None:
            margin = margin.to(scores)
        per_pair = reward_pair_losses(chosen, rejected, margin, self.center_coefficient)
        loss = per_pair.sum() / max(normalizer, 1)
        c, r = chosen.detach(), rejected.detach()
        acc = (c > r).float().mean()
        metrics = {"accuracy": acc, "margin": (c - r).mean(), "rewards/chosen": c.mean(), "rewards/rejected": r.mean(),
                   "rewards/margins": (c - r).mean(), "rewards/accuracies": acc, "mean_reward": scores.detach().mean(),
                   "min_reward": scores.detach().min(), "max_reward": scores.detach().max()}
        return loss, as_floats(metrics)
