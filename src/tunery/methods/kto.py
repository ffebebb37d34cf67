"""Kahneman-Tversky Optimization (Ethayarajh et al., 2024): unpaired desirable / undesirable completions.

Per row, with r = log pi(y|x) - log pi_ref(y|x) and the reference point z = max(0, mean KL estimate):

    desirable:   w_D (1 - s(beta (r - z)))
    undesirable: w_U (1 - s(beta (z - r)))

z is estimated, without gradient, from mismatched (prompt i, completion of another row) pairs of the same
micro-batch: `collate_kto` appends them to the flat row as sequences n..2n-1. Three passes, only one with
gradient: the reference over the whole row (no_grad), the policy over the mismatched pairs (no_grad), the policy over
the real completions (with gradient).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .reference import (
    Reference,
    build_reference,
    model_device,
    precompute_reference,
)
from .sequences import as_floats, forward_hidden, sequence_logps, token_slice


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
               beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-row KTO loss [n]; `kl` is the (already detached, clamped) reference point z."""
    r = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable.bool(), good, bad)


def _mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class KTO:
    name = "kto"
    data_kind = "kto"

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 precompute_ref_log_probs: bool = False):
        self.beta = beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.precompute = precompute_ref_log_probs
        self.reference: Reference | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> KTO:
        if getattr(cfg, "micro_batch_size", 2) < 2:
            raise ValueError("rl: kto estimates its KL reference point from mismatched prompt/completion pairs inside "
                             "a micro-batch: set micro_batch_size to 2 or more (4-8 is typical)")
        return cls(cfg.rl_beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight, cfg.precompute_ref_log_probs)

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["num_rows"])

    # ---- reference ---------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, cfg: Any = None, prepared: Any = None) -> dict[str, Any]:
        if self.precompute and prepared is not None:
            # The mismatched pair of each row is fixed here (prompt i, completion of row i+1 in the split), so its
            # reference log-prob can be computed once; collate_kto uses a row's kl_input_ids when it has them.
            for rows in (prepared.train, prepared.eval or []):
                n = len(rows)
                for i, r in enumerate(rows):
                    other = rows[(i + 1) % n]
                    p_len, o_len = r.get("prompt_len", 0), other.get("prompt_len", 0)
                    r["kl_input_ids"] = r["input_ids"][:p_len] + other["input_ids"][o_len:]
                    r["kl_labels"] = [-100] * p_len + other["labels"][o_len:]
            self.reference = Reference("precomputed")
            return precompute_reference(self.name, model, cfg, prepared, ("ref_logps", "ref_kl_logps"),
                                        lambda r: (r["input_ids"], r["labels"]),
                                        lambda r: (r["kl_input_ids"], r["kl_labels"]))
        self.reference = build_reference(model)
        return {"reference": self.reference.mode}

    # ---- loss --------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any], normalizer: int) -> tuple[torch.Tensor, dict[str, float]]:
        n = int(batch["num_rows"])
        seq = batch["seq_index"]
        total = seq.numel()
        split = int((seq < n).sum())  # completions first, mismatched pairs after
        has_kl = split < total

        if "ref_logps" in batch:
            ref_logps = batch["ref_logps"]
            ref_kl = batch.get("ref_kl_logps")
            if has_kl and ref_kl is None:
                raise ValueError("kto with precomputed reference log-probs needs ref_kl_logps in the batch")
        else:
            if self.reference is None:
                self.reference = build_reference(model)
            if self.reference.mode == "precomputed":
                raise ValueError("kto with precompute_ref_log_probs: the batch lacks ref_logps / ref_kl_logps; "
                                 "collate_kto must pass them through and build each row's KL sequence from its "
                                 "kl_input_ids / kl_labels (set by KTO.setup)")
            with torch.no_grad(), self.reference.use(model) as ref:
                s_ref = sequence_logps(ref, forward_hidden(ref, batch), batch, 2 * n if has_kl else n)
            ref_logps, ref_kl = s_ref.sums[:n], s_ref.sums[n:] if has_kl else None

        kl = torch.zeros((), device=model_device(model))
        if has_kl:
            kl_batch = token_slice(batch, split, total)
            kl_batch["seq_index"] = kl_batch["seq_index"] - n
            with torch.no_grad():
                kl_logps = sequence_logps(model, forward_hidden(model, kl_batch), kl_batch, n).sums
            kl = _mean_across_ranks((kl_logps - ref_kl.to(kl_logps)).mean()).clamp(min=0)

        main = token_slice(batch, 0, split) if has_kl else batch
        s = sequence_logps(model, forward_hidden(model, main), main, n)
        ref_logps = ref_logps.to(s.sums)
        desirable = batch["kto_label"].to(s.sums.device).bool()
        per_row = kto_losses(s.sums, ref_logps, desirable, kl.to(s.sums), self.beta, self.desirable_weight,
                             self.undesirable_weight)
        loss = per_row.sum() / max(normalizer, 1)

        rewards = self.beta * (s.sums - ref_logps).detach()
        metrics: dict[str, Any] = {"kl": kl, "loss/kto": per_row.detach().mean(),
                                   "rewards/desirable_fraction": desirable.float().mean()}
        if bool(desirable.any()):
            metrics["rewards/chosen"] = rewards[desirable].mean()
            metrics["logps/chosen"] = s.sums[desirable].detach().mean()
        if bool((~desirable).any()):
            metrics["rewards/rejected"] = rewards[~desirable].mean()
            metrics["logps/rejected"] = s.sums[~desirable].detach().mean()
        if bool(desirable.any()) and bool((~desirable).any()):
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        # Unpaired data has no pairs to compare: accuracy = rows whose implied reward has the right sign against z.
        right = torch.where(desirable, rewards > self.beta * kl, rewards < self.beta * kl)
        metrics["rewards/accuracies"] = right.float().mean()
        return loss, as_floats(metrics)

