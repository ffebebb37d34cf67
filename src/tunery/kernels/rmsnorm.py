"""RMSNorm: y = x / rms(x) * (offset + weight). offset=1 is Gemma's form.

The fused version keeps only x and the per-row 1/rms (rstd) for backward.
"""

from __future__ import annotations

import torch

from . import num_programs, use_triton_for

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is optional
    triton = None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Matches transformers: normalise in fp32; Llama casts before the weight, Gemma multiplies in fp32."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (offset + weight.float())).to(dtype)
    return weight * h.to(dtype)


if triton is not None:

    @triton.jit
    def _rms_fwd_kernel(X, Y, W, RSTD, stride_x, stride_y, n_rows, n_cols, eps, offset,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, CAST_FIRST: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < n_rows
        cmask = cols < n_cols
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        xn = x * rstd[:, None]
        if CAST_FIRST:
            y = xn.to(Y.dtype.element_ty).to(tl.float32) * w[None, :]
        else:
            y = xn * (offset + w[None, :])
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_bwd_kernel(DY, X, W, RSTD, DX, DW, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset,
                        rows_per_prog, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        CAST_FIRST: tl.constexpr, HAS_DW: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < n_cols
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        first = pid * rows_per_prog
        last = first + rows_per_prog
        for r0 in range(first, last, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rmask = (rows < n_rows) & (rows < last)
            mask = rmask[:, None] & cmask[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xn = x * rstd[:, None]
            if CAST_FIRST:
                if HAS_DW:
                    dw_acc += tl.sum(dy * xn.to(DX.dtype.element_ty).to(tl.float32), axis=0)
                dxn = dy * w[None, :]
            else:
                if HAS_DW:
                    dw_acc += tl.sum(dy * xn, axis=0)
                dxn = dy * (offset + w[None, :])
            c = tl.sum(dxn * xn, axis=1) / n_cols
            dx = (dxn - xn * c[:, None]) * rstd[:, None]
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            tl.store(DW + pid * n_cols + cols, dw_acc, mask=cmask)


def _launch_shape(n_cols: int) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(n_cols)
    block_r = max(1, min(64, 4096 // block_d))
    elems = block_d * block_r
    warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return block_d, block_r, warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                     use_triton: bool = False, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, D] (last dim contiguous) -> (y [R, D] in x.dtype, rstd [R] fp32). `out`: where to write y,
    any [R, D] view with a contiguous last dim (e.g. the left columns of a wider buffer)."""
    if not use_triton:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
        xn = xf * rstd[:, None]
        y = (xn * (offset + weight.float())).to(x.dtype) if offset else (weight * xn.to(x.dtype)).to(x.dtype)
        return (y, rstd) if out is None else (out.copy_(y), rstd)
    x = x if x.stride(-1) == 1 else x.contiguous()
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype) if out is None else out
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    if n_rows == 0:
        return y, rstd
    block_d, block_r, warps = _launch_shape(n_cols)
    grid = (triton.cdiv(n_rows, block_r),)
    _rms_fwd_kernel[grid](x, y, weight, rstd, x.stride(0), y.stride(0), n_rows, n_cols, eps, float(offset),
                          BLOCK_R=block_r, BLOCK_D=block_d, CAST_FIRST=not offset, num_warps=warps)
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                      offset: float = 0.0, need_dw: bool = True,
                      use_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of rms_norm_forward: dx [R, D] in x.dtype and dweight (None unless need_dw)."""
    if not use_triton:
        xn = x.float() * rstd[:, None]
        dyf = dy.float()
        if offset:
            dxn = dyf * (offset + weight.float())
            dw = (dyf * xn).sum(0) if need_dw else None
        else:
            dxn = dyf * weight.float()
            dw = (dyf * xn.to(x.dtype).float()).sum(0) if need_dw else None
        c = (dxn * xn).mean(-1, keepdim=True)
        dx = ((dxn - xn * c) * rstd[:, None]).to(x.dtype)
        return dx, (dw.to(weight.dtype) if dw is not None else None)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    if n_rows == 0:
        return dx, (torch.zeros_like(weight) if need_dw else None)
    block_d, block_r, warps = _launch_shape(n_cols)
    progs = max(1, min(num_programs(x, 2), triton.cdiv(n_rows, block_r)))
    rows_per_prog = triton.cdiv(triton.cdiv(n_rows, progs), block_r) * block_r
    progs = triton.cdiv(n_rows, rows_per_prog)
    dw_part = torch.empty((progs, n_cols), device=x.device, dtype=torch.float32) if need_dw else dx
    _rms_bwd_kernel[(progs,)](dy, x, weight, rstd, dx, dw_part, dy.stride(0), x.stride(0), dx.stride(0),
                              n_rows, n_cols, float(offset), rows_per_prog, BLOCK_R=block_r, BLOCK_D=block_d,
                              CAST_FIRST=not offset, HAS_DW=need_dw, num_warps=warps)
    dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Saves x and rstd only; the normalised rows are recomputed in backward."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, use_triton):
        shape = x.shape
        x2 = _rows(x)
        y, rstd = rms_norm_forward(x2, weight, eps, offset, use_triton)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.use_triton, ctx.shape = offset, use_triton, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(_rows(dy), x2, rstd, weight, ctx.offset, ctx.needs_input_grad[1],
                                   ctx.use_triton)
        return dx.view(ctx.shape), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             fused: bool | None = None) -> torch.Tensor:
    """fused=None: the Triton kernel for CUDA tensors, the reference elsewhere; False: always the reference."""
    if use_triton_for(x, fused):
        return _rms_norm_fused(x, weight, eps, float(offset))
    return rms_norm_reference(x, weight, eps, offset)


@torch.compiler.disable
def _rms_norm_fused(x, weight, eps, offset):
    return RMSNormFunction.apply(x, weight, eps, offset, True)
