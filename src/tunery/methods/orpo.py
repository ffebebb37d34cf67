"""Odds Ratio Preference Optimization (Hong et al., 2024): SFT on the chosen answers plus an odds-ratio term.

No reference model. With P the length-averaged (per-token mean) log-probs and odds(y) = P(y) / (1 - P(y)):

    L = NLL(chosen) - alpha * log s(log odds(y_w) - log odds(y_l))

The NLL is the mean over every trained token of the chosen answers (the answer only unless train_on_inputs; trl
also counts the prompt tokens). One forward pass for chosen and rejected.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sequences import as_floats, chosen_nll, forward_hidden, pair_metrics, sequence_logps


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_terms(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log s(log odds ratio), log odds ratio) per pair, from per-token mean log-probs."""
    c, r = chosen_avg.float(), rejected_avg.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return F.logsigmoid(log_odds), log_odds


class ORPO:
    name = "orpo"
    data_kind = "preference"

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha

    @classmethod
    def from_config(cls, cfg: Any) -> ORPO:
        return cls(cfg.orpo_alpha)

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["num_pairs"])

    def loss(self, model: nn.Module, batch: dict[str, Any], normalizer: int) -> tuple[torch.Tensor, dict[str, float]]:
        p = int(batch["num_pairs"])
        s = sequence_logps(model, forward_hidden(model, batch), batch, 2 * p)
        avg = s.means
        chosen, rejected = avg[:p], avg[p:]
        ratio, log_odds = odds_ratio_terms(chosen, rejected)
        nll = chosen_nll(s, p)
        norm = max(normalizer, 1)
        # nll is a token mean over this micro-batch's chosen answers: weight it by the micro-batch's share of pairs
        loss = nll * (p / norm) - self.alpha * ratio.sum() / norm
        metrics = pair_metrics(self.alpha * chosen, self.alpha * rejected, chosen, rejected)
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                        "log_odds_chosen": log_odds.detach().mean()})
        return loss, as_floats(metrics)
