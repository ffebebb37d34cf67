"""Rotary position embedding driven by position_ids (so packed rows restart at 0 per document)."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import use_triton_for

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is optional
    triton = None


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
    freqs = position_ids.float()[..., None] * inv_freq.to(device=position_ids.device, dtype=torch.float32)[None, None, :]
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


if triton is not None:

    @triton.jit
    def _rope_kernel(X, OUT, COS, SIN, stride_xn, stride_on, stride_cn, n_heads, head_dim, half,
                     BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
        """One token per program: rotates the first 2*half dims of every head (rotate-half layout)."""
        n = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK_HALF)
        jm = j < half
        c = tl.load(COS + n * stride_cn + j, mask=jm, other=0.0).to(tl.float32)
        s = tl.load(SIN + n * stride_cn + j, mask=jm, other=0.0).to(tl.float32)
        if BACKWARD:
            s = -s
        for h0 in range(0, n_heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            m = (h < n_heads)[:, None] & jm[None, :]
            src = X + n * stride_xn + h[:, None] * head_dim + j[None, :]
            x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(src + half, mask=m, other=0.0).to(tl.float32)
            dst = OUT + n * stride_on + h[:, None] * head_dim + j[None, :]
            tl.store(dst, (x1 * c[None, :] - x2 * s[None, :]).to(OUT.dtype.element_ty), mask=m)
            tl.store(dst + half, (x2 * c[None, :] + x1 * s[None, :]).to(OUT.dtype.element_ty), mask=m)


def _rope_triton(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [B, T, H, D] -> rotated copy; cos2/sin2 [B*T, rd] with halves repeated."""
    b, t, h, d = x.shape
    rd = cos2.shape[-1]
    x2 = x.reshape(b * t, h * d)
    if x2.stride(-1) != 1 or x2.stride(0) != h * d:
        x2 = x2.contiguous()
    out = torch.empty_like(x2) if rd == d else x2.clone()
    if out.numel() == 0:
        return out.view(b, t, h, d)
    half = rd // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(h), 2048 // block_half))
    _rope_kernel[(b * t,)](x2, out, cos2, sin2, x2.stride(0), out.stride(0), cos2.stride(0), h, d, half,
                           BLOCK_H=block_h, BLOCK_HALF=block_half, BACKWARD=backward, num_warps=4)
    return out.view(b, t, h, d)


def _cos_sin_rows(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rd = cos.shape[-1]
    return cos.reshape(-1, rd).contiguous(), sin.reshape(-1, rd).contiguous()


class RoPEFunction(torch.autograd.Function):
    """Rotates q and k; saves nothing but cos/sin (shared by every layer). Backward rotates by -angle."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        c2, s2 = _cos_sin_rows(cos, sin)
        ctx.save_for_backward(c2, s2)
        return _rope_triton(q, c2, s2, False), _rope_triton(k, c2, s2, False)

    @staticmethod
    def backward(ctx, dq, dk):
        c2, s2 = ctx.saved_tensors
        dq = _rope_triton(dq, c2, s2, True) if dq is not None else None
        dk = _rope_triton(dk, c2, s2, True) if dk is not None else None
        return dq, dk, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool | None = None):
    """q [B, T, H, D], k [B, T, Hkv, D]; cos/sin [B, T, rd] from rope_cos_sin (halves repeated).

    fused=None: the Triton kernel for CUDA tensors, the reference elsewhere.
    """
    if use_triton_for(q, fused):
        return _apply_rope_fused(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


@torch.compiler.disable
def _apply_rope_fused(q, k, cos, sin):
    return RoPEFunction.apply(q, k, cos, sin)
