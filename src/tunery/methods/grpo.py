"""GRPO: group-relative advantages and the clipped policy-gradient loss (DAPO, Dr. GRPO, BNPO, GSPO variants).

The rollout (sampling, rewards) lives in train/grpo_loop.py; this module holds the math, on plain tensors:

- `group_advantages`: A_i = (r_i - mean of its group) / (std + 1e-4), std per group, over the batch, or none.
- `policy_loss`: ratio r = exp(logp - logp_old) per token (or the exp of its masked mean per sequence: GSPO),
  loss_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3 KL to the reference, then each loss
  type's normalisation. With one policy update per rollout logp_old = logp.detach(): the ratio is 1 and the
  gradient is the plain policy gradient. Same definitions as trl's GRPOTrainer (tested against it).
- `completion_logps`: per-token log-probs of the completion tokens of a flat, padding-free batch (prompt and
  completion of every sequence in one row), at the sampling temperature, from hidden states through the
  chunked LM-head kernel; returned padded as [S, L] with the token mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..kernels.cross_entropy import token_logprobs
from .common import shifted_labels
from .sequences import forward_hidden, softcap_of

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


@dataclass
class StepTotals:
    """Counts over the whole optimizer step (every micro-batch of every rank): each micro-batch's loss is divided
    by them, so the sum of micro-batch losses is the loss of the step, whatever the split."""

    sequences: int
    tokens: int
    micro_batches: int = 1


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group",
                     batch_std: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [N] (N = prompts x G, groups contiguous) -> (advantages [N], the std each was divided by [N]).

    scale: group (each group's own std), batch (one std over all rewards; `batch_std` overrides it, e.g. the
    std over every rank), none (centred only). std is the unbiased one, as trl uses.
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(1).repeat_interleave(num_generations)
    if scale in ("group", "none"):
        std = grouped.std(1).repeat_interleave(num_generations) if num_generations > 1 else torch.zeros_like(rewards)
    elif scale == "batch":
        if batch_std is None:
            batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        std = torch.as_tensor(batch_std, dtype=rewards.dtype, device=rewards.device).expand_as(rewards)
    else:
        raise ValueError(f"scale_rewards must be group, batch or none (got {scale!r})")
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return adv, std


def policy_loss(
    logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
    loss_type: str = "dapo", level: str = "token", epsilon: float = 0.2, epsilon_high: float | None = None,
    beta: float = 0.0, max_completion_length: int | None = None, totals: StepTotals | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of one micro-batch.

    logps, old_logps, ref_logps, mask: [S, L] (padded completions; mask 1 on trained tokens); advantages [S].
    `totals` are the step's counts (default: this micro-batch alone). Returns (loss, sums) where sums holds
    token/sequence sums for the step's metrics: tokens, clipped, clipped_low, clipped_high, kl (when beta > 0).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (got {loss_type!r})")
    mask = mask.to(logps.dtype)
    if totals is None:
        totals = StepTotals(sequences=logps.shape[0], tokens=int(mask.sum()), micro_batches=1)
    eps_low, eps_high = epsilon, (epsilon if epsilon_high is None else epsilon_high)
    adv = advantages.to(logps.dtype)[:, None]
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if level == "token":
        log_w = log_ratio
    elif level == "sequence":  # GSPO: one ratio per sequence, the exp of the mean token log-ratio
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    else:
        raise ValueError(f"importance_sampling_level must be token or sequence (got {level!r})")
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl

    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(totals.sequences, 1)
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0) / max(totals.micro_batches, 1)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        loss = masked.sum() / (max(totals.sequences, 1) * max_completion_length)
    else:  # dapo: every completion token of the whole step weighs the same
        loss = masked.sum() / max(totals.tokens, 1)

    with torch.no_grad():
        low = ((coef_1 < 1 - eps_low) & (adv < 0)).expand_as(mask).to(mask.dtype)
        high = ((coef_1 > 1 + eps_high) & (adv > 0)).expand_as(mask).to(mask.dtype)
        parts = [mask.sum(), (low * mask).sum(), (high * mask).sum(), ((low + high).clamp(max=1) * mask).sum()]
        if kl is not None:
            parts.append((kl * mask).sum())
        vals = torch.stack([p.float() for p in parts]).tolist()
    sums = {"tokens": vals[0], "clipped_low": vals[1], "clipped_high": vals[2], "clipped": vals[3]}
    if kl is not None:
        sums["kl"] = vals[4]
    return loss, sums


# ---- log-probs of completions in a flat batch -------------------------------------------------------------------

def rollout_batch(sequences: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """A flat batch of (prompt_ids, completion_ids) pairs: one document per pair, labels on the completion.

    `comp_seq`/`comp_pos` [K] say which sequence and completion position each trained token is (flat order),
    so per-token values can be laid out as [S, L] without padding the forward pass.
    """
    from ..models.decoder import doc_boundaries

    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    comp_seq: list[int] = []
    comp_pos: list[int] = []
    longest = 0
    for i, (p, c) in enumerate(sequences):
        if not p:
            raise ValueError(f"sequence {i} has an empty prompt")
        ids += p + c
        labels += [-100] * len(p) + list(c)
        pos += list(range(len(p) + len(c)))
        comp_seq += [i] * len(c)
        comp_pos += list(range(len(c)))
        longest = max(longest, len(c))
    position_ids = torch.tensor(pos, dtype=torch.long)[None]
    cu, max_len = doc_boundaries(position_ids)
    return {"input_ids": torch.tensor(ids, dtype=torch.long)[None], "labels": torch.tensor(labels, dtype=torch.long)[None],
            "position_ids": position_ids, "cu_seqlens": cu, "max_seqlen": max_len,
            "comp_seq": torch.tensor(comp_seq, dtype=torch.long), "comp_pos": torch.tensor(comp_pos, dtype=torch.long),
            "num_seqs": len(sequences), "comp_len": max(longest, 1)}


def completion_logps(model: nn.Module, batch: dict[str, Any], temperature: float = 1.0) -> torch.Tensor:
    """log p(completion token) under `model` at `temperature`, as [S, L] (0 past each completion's end).

    logits / T is computed as (h / T) W^T, and a final soft-cap c becomes c / T (tanh(z/c) c / T equals
    tanh((z/T) / (c/T)) (c/T)), so the chunked kernel never builds [tokens x vocab] logits.
    """
    hidden = forward_hidden(model, batch)
    labels = shifted_labels(batch).reshape(-1).to(hidden.device)
    keep = (labels != -100).nonzero().squeeze(-1)
    h, y = hidden[keep], labels[keep]
    softcap = softcap_of(model)
    if temperature != 1.0:
        h = h / temperature
        softcap = softcap / temperature if softcap is not None else None
    tok = token_logprobs(h, model.head_weight, y, softcap=softcap)
    out = tok.new_zeros(batch["num_seqs"], batch["comp_len"])
    return out.index_put((batch["comp_seq"].to(tok.device), batch["comp_pos"].to(tok.device)), tok)


# ---- the method object (what `rl: grpo` builds) ------------------------------------------------------------------

@dataclass
class GRPO:
    """GRPO's loss settings, read from the config's `grpo:` section. The recipe is train/grpo_loop.py."""

    num_generations: int = 8
    loss_type: str = "dapo"
    level: str = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    scale_rewards: str = "group"
    temperature: float = 1.0
    max_completion_length: int = 256
    name: str = "grpo"
    data_kind: str = "prompts"

    @classmethod
    def from_config(cls, cfg: Any) -> GRPO:
        g = cfg.grpo
        return cls(num_generations=g.num_generations, loss_type=g.loss_type, level=g.importance_sampling_level,
                   epsilon=g.epsilon, epsilon_high=g.epsilon_high, beta=g.beta, scale_rewards=g.scale_rewards,
                   temperature=g.temperature, max_completion_length=g.max_completion_length)

    def loss(self, model: nn.Module, batch: dict[str, Any], totals: StepTotals) -> tuple[torch.Tensor, dict[str, float]]:
        """batch: `rollout_batch` plus advantages [S], mask [S, L], and old_logps / ref_logps [S, L] when needed."""
        logps = completion_logps(model, batch, self.temperature)
        mask = batch["mask"].to(logps.device)[:, : logps.shape[1]]
        def cut(key: str) -> torch.Tensor | None:
            t = batch.get(key)
            return None if t is None else t.to(logps.device)[:, : logps.shape[1]]

        return policy_loss(logps, batch["advantages"].to(logps.device), mask, old_logps=cut("old_logps"),
                           ref_logps=cut("ref_logps"), loss_type=self.loss_type, level=self.level,
                           epsilon=self.epsilon, epsilon_high=self.epsilon_high, beta=self.beta,
                           max_completion_length=self.max_completion_length, totals=totals)


def build(cfg: Any) -> GRPO:
    return GRPO.from_config(cfg)
