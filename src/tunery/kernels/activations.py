"""Gated MLP activations: SwiGLU (Llama, Qwen, Mistral) and GeGLU (Gemma, tanh or erf).

The fused version computes act(gate) * up in one pass and, in backward, the gradients for gate and
up (and, for the fused LoRA MLP, the product itself again) from gate and up alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import use_triton_for

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is optional
    triton = None

KINDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


def gated_act_reference(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return swiglu_reference(gate, up)
    if kind == "gelu_tanh":
        return geglu_reference(gate, up, "tanh")
    if kind == "gelu":
        return geglu_reference(gate, up, "none")
    raise ValueError(f"unsupported activation {kind!r} (supported: silu, gelu_tanh, gelu)")


if triton is not None:

    @triton.jit
    def _act_and_grad(g, KIND: tl.constexpr):
        """act(g) and act'(g) in fp32. tanh is written through sigmoid (no libdevice dependency)."""
        if KIND == 0:
            sg = tl.sigmoid(g)
            a = g * sg
            da = sg * (1.0 + g * (1.0 - sg))
        elif KIND == 1:
            k0 = 0.7978845608028654
            inner = k0 * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
            a = 0.5 * g * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k0 * (1.0 + 3.0 * 0.044715 * g * g)
        else:
            e = tl.erf(g * 0.7071067811865476)
            a = 0.5 * g * (1.0 + e)
            da = 0.5 * (1.0 + e) + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
        return a, da

    @triton.jit
    def _act_fwd_kernel(G, U, H, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, KIND)
        tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=m)

    @triton.jit
    def _act_bwd_kernel(DH, G, U, H, DG, DU, n, KIND: tl.constexpr, STORE_H: tl.constexpr, BLOCK: tl.constexpr):
        """Reads dh, gate, up; writes dgate, dup (and act(gate)*up when STORE_H). Outputs may alias inputs."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        dh = tl.load(DH + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, KIND)
        if STORE_H:
            tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=m)
        tl.store(DG + offs, (dh * u * da).to(DG.dtype.element_ty), mask=m)
        tl.store(DU + offs, (dh * a).to(DU.dtype.element_ty), mask=m)


_BLOCK = 2048


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _act_grad_torch(g: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = g.float()
    if kind == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    if kind == "gelu_tanh":
        k0 = math.sqrt(2 / math.pi)
        t = torch.tanh(k0 * (g + 0.044715 * g**3))
        return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k0 * (1 + 3 * 0.044715 * g * g)
    if kind == "gelu":
        e = torch.erf(g / math.sqrt(2))
        return 0.5 * g * (1 + e), 0.5 * (1 + e) + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    raise ValueError(f"unsupported activation {kind!r} (supported: silu, gelu_tanh, gelu)")


def gated_act_forward(gate: torch.Tensor, up: torch.Tensor, kind: str, use_triton: bool = False) -> torch.Tensor:
    """act(gate) * up without autograd (used inside the fused functions)."""
    if not use_triton:
        a, _ = _act_grad_torch(gate, kind)
        return (a * up.float()).to(gate.dtype)
    gate, up = _flat(gate), _flat(up)
    h = torch.empty_like(gate)
    n = gate.numel()
    if n == 0:
        return h
    _act_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, h, n, KIND=KINDS[kind], BLOCK=_BLOCK, num_warps=8)
    return h


def gated_act_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: str, use_triton: bool = False,
                       want_h: bool = False, reuse_inputs: bool = False):
    """(h or None, dgate, dup) from dh, gate, up.

    On the Triton path h (when wanted) is written over dh's buffer, so pass a dh you own; with
    reuse_inputs=True dgate and dup are written over gate and up too (no new [tokens, inter] buffers).
    """
    if not use_triton:
        a, da = _act_grad_torch(gate, kind)
        dhf, uf = dh.float(), up.float()
        h = (a * uf).to(gate.dtype) if want_h else None
        return h, (dhf * uf * da).to(gate.dtype), (dhf * a).to(up.dtype)
    dh, gate, up = _flat(dh), _flat(gate), _flat(up)
    if reuse_inputs:
        dg, du = gate, up
    else:
        dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n == 0:
        return (dh if want_h else None), dg, du
    _act_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dh, gate, up, dh, dg, du, n, KIND=KINDS[kind], STORE_H=want_h,
                                               BLOCK=_BLOCK, num_warps=8)
    return (dh if want_h else None), dg, du


class GatedActFunction(torch.autograd.Function):
    """act(gate) * up; saves gate and up, recomputes act(gate) in backward."""

    @staticmethod
    def forward(ctx, gate, up, kind):
        ctx.kind = kind
        ctx.save_for_backward(gate, up)
        return gated_act_forward(gate, up, kind, True)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        _, dg, du = gated_act_backward(dh, gate, up, ctx.kind, True)
        return dg, du, None


def gated_act(gate: torch.Tensor, up: torch.Tensor, kind: str, fused: bool | None = None) -> torch.Tensor:
    """kind: silu | gelu_tanh | gelu. fused=None: Triton for CUDA tensors, the reference elsewhere."""
    if kind not in KINDS:
        raise ValueError(f"unsupported activation {kind!r} (supported: silu, gelu_tanh, gelu)")
    if use_triton_for(gate, fused) and gate.shape == up.shape:
        return _gated_act_fused(gate, up, kind)
    return gated_act_reference(gate, up, kind)


@torch.compiler.disable
def _gated_act_fused(gate, up, kind):
    return GatedActFunction.apply(gate, up, kind)
