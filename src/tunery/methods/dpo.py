"""Direct Preference Optimization (Rafailov et al., 2023) and its IPO, hinge and robust variants.

Chosen and rejected answers go through one forward pass (the flat batch of `collate_preference`: all chosen
sequences, then all rejected ones); sequence log-probs come from hidden states in chunks. The reference runs
first, under no_grad (see reference.py for where it comes from).

Per pair, with h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):

- sigmoid: -(1 - eps) log s(beta h) - eps log s(-beta h)   (eps = dpo_label_smoothing: conservative DPO)
- ipo:     (h_avg - 1 / (2 beta))^2, with each log-ratio divided by its completion length (as trl, and the IPO
           authors' reported runs)
- hinge:   relu(1 - beta h)                                  (SLiC)
- robust:  ((1 - eps)(-log s(beta h)) - eps(-log s(-beta h))) / (1 - 2 eps)   (rDPO, Chowdhury et al., 2024)

`rpo_alpha` adds alpha x the NLL of the chosen answers, averaged over their tokens (RPO, Pang et al., 2024; as trl's
rpo_alpha / `loss_type: [sigmoid, sft]`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reference import (
    Reference,
    build_reference,
    precompute_reference,
)
from .sequences import as_floats, chosen_nll, forward_hidden, pair_metrics, sequence_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
               rejected_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO-family loss [P] from summed sequence log-probs [P]."""
    chosen_lr = chosen_logps - ref_chosen_logps
    rejected_lr = rejected_logps - ref_rejected_logps
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs the completion lengths")
        h = chosen_lr / chosen_lengths.clamp(min=1) - rejected_lr / rejected_lengths.clamp(min=1)
        return (h - 1 / (2 * beta)) ** 2
    h = chosen_lr - rejected_lr
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "robust":
        return ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    raise ValueError(f"dpo_loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


class DPO:
    name = "dpo"
    data_kind = "preference"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 rpo_alpha: float | None = None, precompute_ref_log_probs: bool = False):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo_loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.rpo_alpha = rpo_alpha
        self.precompute = precompute_ref_log_probs
        self.reference: Reference | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> DPO:
        return cls(cfg.rl_beta, cfg.dpo_loss_type, cfg.dpo_label_smoothing, cfg.rpo_alpha, cfg.precompute_ref_log_probs)

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["num_pairs"])

    # ---- reference ---------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, cfg: Any = None, prepared: Any = None) -> dict[str, Any]:
        """Called once before the first step: choose the reference, or precompute its log-probs into the rows."""
        if self.precompute and prepared is not None:
            self.reference = Reference("precomputed")
            return precompute_reference(self.name, model, cfg, prepared, ("ref_chosen_logps", "ref_rejected_logps"),
                                        lambda r: (r["chosen_input_ids"], r["chosen_labels"]),
                                        lambda r: (r["rejected_input_ids"], r["rejected_labels"]))
        self.reference = build_reference(model)
        return {"reference": self.reference.mode}

    def reference_logps(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        p = int(batch["num_pairs"])
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.reference is None:  # setup() was not called: the first loss call still sees the starting policy
            self.reference = build_reference(model)
        with torch.no_grad(), self.reference.use(model) as ref:
            s = sequence_logps(ref, forward_hidden(ref, batch), batch, 2 * p)
        return s.sums[:p], s.sums[p:]

    # ---- loss --------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any], normalizer: int) -> tuple[torch.Tensor, dict[str, float]]:
        p = int(batch["num_pairs"])
        ref_c, ref_r = self.reference_logps(model, batch)
        s = sequence_logps(model, forward_hidden(model, batch), batch, 2 * p)
        ref_c, ref_r = ref_c.to(s.sums), ref_r.to(s.sums)
        chosen, rejected = s.sums[:p], s.sums[p:]
        per_pair = dpo_losses(chosen, rejected, ref_c, ref_r, self.beta, self.loss_type, self.label_smoothing,
                              s.counts[:p], s.counts[p:])
        norm = max(normalizer, 1)
        loss = per_pair.sum() / norm
        metrics = pair_metrics(self.beta * (chosen - ref_c), self.beta * (rejected - ref_r), chosen, rejected)
        metrics["logps/accuracies"] = (chosen > rejected).float().mean()
        metrics["loss/preference"] = per_pair.detach().mean()
        if self.rpo_alpha:
            nll = chosen_nll(s, p)
            loss = loss + self.rpo_alpha * nll * (p / norm)
            metrics["nll_loss"] = nll.detach()
        return loss, as_floats(metrics)

