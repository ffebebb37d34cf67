"""Per-sequence quantities of a flat, padding-free batch, straight from hidden states.

Preference batches (`collate_preference`, `collate_kto`) hold many sequences in one [1, N] row; `seq_index` [N]
says which sequence each token belongs to. Sequence log-probs are per-token log-probs from the chunked LM-head
kernel (never the [N, vocab] logits) summed per sequence with `index_add`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..kernels.cross_entropy import token_logprobs
from ..models.decoder import doc_boundaries
from .common import shifted_labels


def softcap_of(model: nn.Module) -> float | None:
    return getattr(getattr(model, "cfg", None), "final_softcap", None)


def forward_hidden(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Final hidden states of the flat row, as [N, H]."""
    h = model(batch["input_ids"], batch["position_ids"], batch.get("cu_seqlens"), batch.get("max_seqlen"))
    return h.reshape(-1, h.shape[-1])


@dataclass
class SeqLogps:
    sums: torch.Tensor         # [S] summed log p(label) over each sequence's trained tokens
    counts: torch.Tensor       # [S] trained tokens per sequence (float)
    token_logps: torch.Tensor  # [N] per-token log p(label), 0 where not trained
    mask: torch.Tensor         # [N] bool, trained (shifted) positions

    @property
    def means(self) -> torch.Tensor:
        """Length-normalised log-probs (SimPO, ORPO, IPO)."""
        return self.sums / self.counts.clamp(min=1)


def sequence_logps(model: nn.Module, hidden: torch.Tensor, batch: dict[str, Any], num_seqs: int) -> SeqLogps:
    """Log-prob of each sequence's trained tokens under `model`'s LM head, from hidden states [N, H]."""
    labels = shifted_labels(batch).reshape(-1).to(hidden.device)
    tok = token_logprobs(hidden, model.head_weight, labels, softcap=softcap_of(model))
    seq = batch["seq_index"].to(hidden.device)
    mask = labels != -100
    sums = tok.new_zeros(num_seqs).index_add(0, seq, tok)
    counts = tok.new_zeros(num_seqs).index_add(0, seq, mask.to(tok.dtype))
    return SeqLogps(sums, counts, tok, mask)


def last_token_index(seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Position of each sequence's last token in the flat row [S] (where a reward model reads its score)."""
    pos = torch.arange(seq_index.numel(), device=seq_index.device)
    out = torch.full((num_seqs,), -1, dtype=torch.long, device=seq_index.device)
    out = out.scatter_reduce(0, seq_index, pos, reduce="amax", include_self=True)
    if bool((out < 0).any()):
        raise ValueError(f"batch has an empty sequence: seq_index covers {int((out >= 0).sum())} of {num_seqs}")
    return out


def token_slice(batch: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """Tokens [start, end) of a flat batch as a batch of their own (documents must not straddle the cut)."""
    pos = batch["position_ids"][:, start:end]
    cu, max_len = doc_boundaries(pos)
    out = {"input_ids": batch["input_ids"][:, start:end], "labels": batch["labels"][:, start:end],
           "position_ids": pos, "cu_seqlens": cu.to(pos.device), "max_seqlen": max_len}
    if "seq_index" in batch:
        out["seq_index"] = batch["seq_index"][start:end]
    return out


def as_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """0-d tensors to Python floats with one device sync."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        vals = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()  # type: ignore[union-attr]
        out.update(zip(keys, vals))
    return out


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                 rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics every preference method logs (names as trl logs them), averaged over the pairs."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    lc, lr = chosen_logps.detach().float(), rejected_logps.detach().float()
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).float().mean(),
        "logps/chosen": lc.mean(),
        "logps/rejected": lr.mean(),
    }


def flat_rows_batch(seqs: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """A flat batch of whole sequences [(input_ids, labels)], one document each, with `seq_index` 0..S-1.

    The same layout `data.collate` builds; used to precompute reference log-probs outside the training loop
    (methods do not import data/)."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    seq: list[int] = []
    for i, (x, y) in enumerate(seqs):
        ids += x
        labels += y
        pos += list(range(len(x)))
        seq += [i] * len(x)
    position_ids = torch.tensor(pos, dtype=torch.long)[None]
    cu, max_len = doc_boundaries(position_ids)
    return {"input_ids": torch.tensor(ids, dtype=torch.long)[None], "labels": torch.tensor(labels, dtype=torch.long)[None],
            "position_ids": position_ids, "cu_seqlens": cu, "max_seqlen": max_len,
            "seq_index": torch.tensor(seq, dtype=torch.long)}


def chosen_nll(s: SeqLogps, num_chosen: int) -> torch.Tensor:
    """Mean NLL over every trained token of sequences 0..num_chosen-1 (the chosen answers) of the micro-batch."""
    return -s.sums[:num_chosen].sum() / s.counts[:num_chosen].sum().clamp(min=1)
