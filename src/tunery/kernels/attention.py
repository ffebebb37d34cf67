"""Document-isolated causal attention for padding-free rows.

A batch is one flat row per micro-batch: documents are told apart by `cu_seqlens` (cumulative
lengths). On CPU the reference runs SDPA per document; on a GPU the varlen/flex paths take over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa(q, k, v, scale, window, softcap):
    """q: [H, T, D], k/v: [Hkv, T, D] -> [H, T, D], causal (and sliding window / soft-cap if set)."""
    rep = q.shape[0] // k.shape[0]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
    if window is None and softcap is None:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale)[0]
    t = q.shape[1]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(t, device=q.device)
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask = mask & (i[:, None] - i[None, :] < window)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
    window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:
    """q: [N, H, D], k/v: [N, Hkv, D] for the flat token stream; returns [N, H, D]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        o = _sdpa(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), scale, window, softcap)
        out[s:e] = o.transpose(0, 1)
    return out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float, window=None, softcap=None, backend: str = "auto"):
    return varlen_attention_reference(q, k, v, cu_seqlens, scale, window, softcap)
