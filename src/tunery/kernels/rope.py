"""Rotary position embedding driven by position_ids (so packed rows restart at 0 per document)."""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, params: dict[str, Any] | None, max_position: int = 8192) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling for `rope_type` default, linear, llama3 or yarn."""
    params = dict(params or {})
    base = float(params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    partial = float(params.get("partial_rotary_factor", 1.0))
    dim = int(head_dim * partial)
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scale = 1.0
    if rope_type == "linear":
        inv = inv / float(params["factor"])
    elif rope_type == "llama3":
        factor = float(params["factor"])
        low = float(params.get("low_freq_factor", 1.0))
        high = float(params.get("high_freq_factor", 4.0))
        old = float(params.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old / low, old / high
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        mid = ~(wl < high_wl) & ~(wl > low_wl)
        inv = torch.where(mid, smoothed, scaled)
    elif rope_type == "yarn":
        factor = float(params["factor"])
        old = float(params.get("original_max_position_embeddings", max_position))
        beta_fast = float(params.get("beta_fast", 32.0))
        beta_slow = float(params.get("beta_slow", 1.0))
        mscale = params.get("attention_factor")
        scale = float(mscale) if mscale is not None else (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

        def corr_dim(rot: float) -> float:
            return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo = max(math.floor(corr_dim(beta_fast)), 0)
        hi = min(math.ceil(corr_dim(beta_slow)), dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrap = 1 - ramp
        inv = (inv / factor) * (1 - extrap) + inv * extrap
    elif rope_type != "default":
        raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3, yarn)")
    return inv, scale


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, T, D] (halves repeated), computed in fp32."""
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)[None, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, H, D]; cos, sin: [B, T, D]. Rotates the first cos.shape[-1] dims (partial rotary)."""
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    rd = cos.shape[-1]
    if rd == q.shape[-1]:
        return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    qr, qp = q[..., :rd], q[..., rd:]
    kr, kp = k[..., :rd], k[..., rd:]
    return (torch.cat([qr * c + _rotate_half(qr) * s, qp], -1), torch.cat([kr * c + _rotate_half(kr) * s, kp], -1))


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False):
    return apply_rope_reference(q, k, cos, sin)
