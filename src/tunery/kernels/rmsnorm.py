"""RMSNorm: y = x / rms(x) * (offset + weight). offset=1 is Gemma's form."""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Matches transformers: normalise in fp32; Llama casts before the weight, Gemma multiplies in fp32."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (offset + weight.float())).to(dtype)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, fused: bool = False) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps, offset)
