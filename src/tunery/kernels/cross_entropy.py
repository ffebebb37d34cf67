"""Linear cross-entropy from hidden states: the LM head and the loss in chunks, never all logits at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_loss(h, weight, labels, softcap, ignore_index, z_loss):
    logits = _chunk_logits(h, weight, softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if z_loss:
        lse = torch.logsumexp(logits, -1)
        loss = loss + z_loss * (lse.pow(2) * (labels != ignore_index)).sum()
    return loss


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    softcap: float | None = None, z_loss: float = 0.0, chunk_size: int = 4096,
) -> torch.Tensor:
    """Summed token loss. hidden [N, H], labels [N] already shifted. Chunks are recomputed in backward."""
    total = hidden.new_zeros((), dtype=torch.float32)
    keep = (labels != ignore_index).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return total + 0.0 * hidden.sum()
    hidden, labels = hidden[keep], labels[keep]
    for s in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[s : s + chunk_size], labels[s : s + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, weight, y, softcap, ignore_index, z_loss, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, y, softcap, ignore_index, z_loss)
    return total


def _chunk_logps(h, weight, labels, softcap):
    logits = _chunk_logits(h, weight, softcap)
    return torch.gather(logits.log_softmax(-1), 1, labels[:, None]).squeeze(1)


def token_logprobs_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    softcap: float | None = None, chunk_size: int = 4096,
) -> torch.Tensor:
    """Per-token log p(label) [N] (0 where ignored), chunked; for DPO-style sequence log-probs."""
    out = hidden.new_zeros(labels.shape, dtype=torch.float32)
    keep = (labels != ignore_index).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return out + 0.0 * hidden.sum()
    hk, yk = hidden[keep], labels[keep]
    parts = []
    for s in range(0, hk.shape[0], chunk_size):
        h, y = hk[s : s + chunk_size], yk[s : s + chunk_size]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, h, weight, y, softcap, use_reentrant=False))
        else:
            parts.append(_chunk_logps(h, weight, y, softcap))
    return out.index_put((keep,), torch.cat(parts))


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, softcap=None, z_loss=0.0, fused: bool = False):
    return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, softcap, z_loss)


def token_logprobs(hidden, weight, labels, ignore_index=-100, softcap=None, fused: bool = False):
    return token_logprobs_reference(hidden, weight, labels, ignore_index, softcap)
