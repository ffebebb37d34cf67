"""Simple Preference Optimization (Meng et al., 2024): length-normalised implicit reward, no reference model.

Per pair, with P the per-token mean log-probs of the answers:

    L = -(1 - eps) log s(beta (P(y_w) - P(y_l)) - gamma) - eps log s(-(beta (P(y_w) - P(y_l)) - gamma))

`simpo_gamma` is the target reward margin gamma (trl's simpo_gamma; the paper tunes gamma / beta around 0.5);
eps is `dpo_label_smoothing` (0 in the paper). SimPO wants a larger beta than DPO (2 to 10 in the paper).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sequences import as_floats, forward_hidden, pair_metrics, sequence_logps


def simpo_losses(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    z = beta * (chosen_avg - rejected_avg) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


class SimPO:
    name = "simpo"
    data_kind = "preference"

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    @classmethod
    def from_config(cls, cfg: Any) -> SimPO:
        return cls(cfg.rl_beta, cfg.simpo_gamma, cfg.dpo_label_smoothing)

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["num_pairs"])

    def loss(self, model: nn.Module, batch: dict[str, Any], normalizer: int) -> tuple[torch.Tensor, dict[str, float]]:
        p = int(batch["num_pairs"])
        s = sequence_logps(model, forward_hidden(model, batch), batch, 2 * p)
        chosen, rejected = s.means[:p], s.means[p:]
        per_pair = simpo_losses(chosen, rejected, self.beta, self.gamma, self.label_smoothing)
        loss = per_pair.sum() / max(normalizer, 1)
        metrics = pair_metrics(self.beta * chosen, self.beta * rejected, chosen, rejected)
        return loss, as_floats(metrics)
