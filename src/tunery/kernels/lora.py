"""Fused (RMSNorm +) LoRA projections and the fused LoRA gated MLP.

One projection is y = x W^T + b + s (x A^T) B^T, with A [r, in], B [out, r], s the LoRA scale.
`fused_linears` runs several projections that share one input (q/k/v, or o alone), optionally with
the RMSNorm in front folded in; `fused_mlp` runs norm -> gate, up -> act -> down. Both are
autograd Functions that save only what backward needs:

- the input before the norm and its 1/rms (the normalised input is recomputed in backward),
- the tiny [tokens, r] LoRA intermediates (already multiplied by s),
- for the MLP, gate and up (or nothing, with `recompute=True`: they are recomputed in backward),
- never the projection outputs, never act(gate) * up.

The LoRA matmuls go through cuBLAS with beta=1 accumulation (no extra elementwise passes), the
scale is folded into the cached compute-dtype copy of A (kernels.cast_params), and the input
gradient of all projections is accumulated into one buffer. No weight gradient is computed for a
frozen base weight. A base weight may come from `weight_fn` (QLoRA: dequantized in forward and
again in backward, never kept; q/k/v and gate/up in one launch each). A quantized group runs B
inside the base GEMM (_kcat_ok; set_lora_kcat(False) or TUNERY_LORA_KCAT=0 turns that off). The
norm and activation run as Triton kernels when `use_triton` is set, in plain PyTorch otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import cached_block_diag, cast_params, compute_dtype, use_triton_for
from .activations import gated_act_backward, gated_act_forward
from .rmsnorm import rms_norm_backward, rms_norm_forward


@dataclass
class LinearSpec:
    """One projection. `weight` is the base [out, in] tensor, or None when `weight_fn` gives it."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 1.0
    weight_fn: Callable[[], torch.Tensor] | None = None
    # the quantized storage behind weight_fn, if any: projections that share an input (q/k/v,
    # gate/up) dequantize in one launch through type(quant).dequantize_many (duck-typed: kernels/
    # imports nothing from quant/)
    quant: Any = None

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.weight, self.bias, self.lora_a, self.lora_b]


@dataclass
class _Meta:
    eps: float
    offset: float
    scales: list[float]
    weight_fns: list[Callable[[], torch.Tensor] | None]
    use_triton: bool
    kind: str = "silu"
    recompute: bool = False
    cdt: torch.dtype | None = None  # compute dtype: autocast's when on (fp32 master weights), else x's
    quants: list = field(default_factory=list)  # LinearSpec.quant per projection


def _weight(ts, i: int, meta: _Meta, dtype, cache: dict | None = None) -> torch.Tensor:
    """Projection i's base weight in `dtype`; with `cache`, a dequantized weight is made once per call
    (the MLP backward needs gate/up for the recompute and again for the input gradient)."""
    w = ts[4 * i]
    if w is None:
        if cache is not None and i in cache:
            return cache[i]
        w = meta.weight_fns[i]()
        if w.dtype != dtype:
            w = w.to(dtype)
        if cache is not None:
            cache[i] = w
        return w
    return w if w.dtype == dtype else w.to(dtype)


def _dequant_group(ts, idx: list[int], meta: _Meta, dtype, cache: dict) -> dict:
    """Fill `cache` with the dequantized base weights of projections idx in one launch when they have
    the same kind of quantized storage (no-op otherwise: _weight dequantizes one at a time)."""
    todo = [i for i in idx if ts[4 * i] is None and i not in cache]
    qs = _group_quants(meta, todo)
    if qs is not None:
        for i, w in zip(todo, type(qs[0]).dequantize_many(qs)):  # each weight's own dtype, then cast,
            cache[i] = w if w.dtype == dtype else w.to(dtype)  # as _weight does
    return cache


def _group_quants(meta: _Meta, idx: list[int]) -> list | None:
    """The quantized storages of projections idx when there are at least two, all of one type that
    can dequantize several in one launch (dequantize_many); else None."""
    qs = [meta.quants[i] if i < len(meta.quants) else None for i in idx]
    if len(qs) < 2 or any(q is None or type(q) is not type(qs[0]) for q in qs):
        return None
    return qs if hasattr(type(qs[0]), "dequantize_many") else None


def _scaled_a(ts, lora: list[int], meta: _Meta, dtype) -> torch.Tensor:
    """s_i * A_i for the projections `lora`, concatenated, in `dtype` (cached until the next step):
    the LoRA scale folded into A, so neither the forward nor the input gradient scales a [N, r]."""
    scales = [meta.scales[i] for i in lora]
    scale = scales[0] if all(s == scales[0] for s in scales) else tuple(scales)
    return cast_params([ts[4 * i + 2] for i in lora], dtype, scale)


def _lora_in(xn: torch.Tensor, ts, idx: list[int], meta: _Meta) -> torch.Tensor | None:
    """[N, sum r] = s_i * (xn A_i^T) for every projection i in idx that has LoRA."""
    lora = [i for i in idx if ts[4 * i + 2] is not None]
    if not lora:
        return None
    return xn @ _scaled_a(ts, lora, meta, xn.dtype).t()


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype` (a LoRA weight gradient, fp32 for fp32 adapters). On CUDA, half inputs give an
    fp32 product in one cuBLAS call: no cast launch (~15 us of CPU each, 14 per block) and no bf16
    rounding of the gradient on the way."""
    if a.dtype == dtype:
        return a @ b
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def _slices(ts, idx: list[int]) -> dict[int, slice]:
    out, off = {}, 0
    for i in idx:
        if ts[4 * i + 2] is not None:
            r = ts[4 * i + 2].shape[0]
            out[i] = slice(off, off + r)
            off += r
    return out


def _project(xn, ts, i, meta, xa_s, sl, wcache: dict | None = None) -> torch.Tensor:
    w = _weight(ts, i, meta, xn.dtype, wcache)
    bias = ts[4 * i + 1]
    if i not in sl:
        return F.linear(xn, w, bias)
    b = cast_params([ts[4 * i + 3]], xn.dtype)
    part = xa_s[:, sl[i]]
    out = torch.addmm(bias.to(xn.dtype), part, b.t()) if bias is not None else part @ b.t()
    return out.addmm_(xn, w.t())


def _linears_backward(xn, dys, ts, idx, meta, xa_s, need, need_dx, wcache: dict | None = None):
    """Weight/LoRA grads of projections idx (list into ts) for output grads dys; returns dxn (or None).

    need: ctx.needs_input_grad offset so that need[4*i + j] is the flag of ts[4*i + j].
    With xa_s = s (xn A^T): d(xa_s) = dy B, dB = dy^T xa_s, dA = s d(xa_s)^T xn, dxn += d(xa_s) (s A).
    """
    grads: dict[int, torch.Tensor | None] = {}
    sl = _slices(ts, idx)
    dxa_parts, lora = [], []
    for i, dy in zip(idx, dys):
        if i not in sl or dy is None:
            continue
        a, b = ts[4 * i + 2], ts[4 * i + 3]
        dxa = dy @ cast_params([b], dy.dtype)  # [N, r] = d(xa_s)
        if need[4 * i + 3]:
            grads[4 * i + 3] = _mm_to(dy.t(), xa_s[:, sl[i]], b.dtype)
        if need[4 * i + 2]:
            da = _mm_to(dxa.t(), xn, a.dtype)
            grads[4 * i + 2] = da.mul_(meta.scales[i]) if meta.scales[i] != 1.0 else da
        dxa_parts.append(dxa)
        lora.append(i)
    dxn = None
    if need_dx and dxa_parts:
        a_all = _scaled_a(ts, lora, meta, dxa_parts[0].dtype)
        dxn = torch.cat(dxa_parts, 1) @ a_all if len(dxa_parts) > 1 else dxa_parts[0] @ a_all
    for i, dy in zip(idx, dys):
        if dy is None:
            continue
        if need_dx:
            w = _weight(ts, i, meta, dy.dtype, wcache)
            dxn = dy @ w if dxn is None else dxn.addmm_(dy, w)
        if need[4 * i]:
            grads[4 * i] = _mm_to(dy.t(), xn, ts[4 * i].dtype)
        if need[4 * i + 1]:
            grads[4 * i + 1] = dy.sum(0).to(ts[4 * i + 1].dtype)
    if need_dx and dxn is None:
        dxn = torch.zeros_like(xn)
    return dxn, grads


def _norm_in(x, norm_w, meta):
    """(normalised input in the compute dtype, 1/rms or None). The norm itself runs in x's dtype."""
    cdt = meta.cdt or x.dtype
    if norm_w is None:
        return (x if x.dtype == cdt else x.to(cdt)), None
    xn, rstd = rms_norm_forward(x, norm_w, meta.eps, meta.offset, meta.use_triton)
    return (xn if xn.dtype == cdt else xn.to(cdt)), rstd


def _norm_back(dxn, x, norm_w, rstd, meta, need_x, need_w):
    if dxn is not None and dxn.dtype != x.dtype:
        dxn = dxn.to(x.dtype)
    if norm_w is None:
        return dxn, None
    if dxn is None:
        return None, None
    dx, dw = rms_norm_backward(dxn, x, rstd, norm_w, meta.offset, need_w, meta.use_triton)
    return (dx if need_x else None), dw


# ------------------------------------------------------------------ B inside the base GEMM (K-concat)
# on unless TUNERY_LORA_KCAT=0: +2% to +6% tokens/s for Llama-8B QLoRA on an H200 (benchmarks/RESULTS.md)
_KCAT = os.environ.get("TUNERY_LORA_KCAT", "1") != "0"


def set_lora_kcat(enabled: bool) -> None:
    """Process-wide switch for the K-concatenated LoRA groups (below); tests and benchmarks flip it."""
    global _KCAT
    _KCAT = bool(enabled)


def _kcat_ok(x, norm_w, ts, idx: list[int], meta: _Meta) -> bool:
    """A group of projections that share a normalised input, over quantized bases (dequantized each
    call anyway), each with LoRA and no bias, runs as [xn | xa_s] @ [W | B_blockdiag]^T: one GEMM per
    projection and no [tokens, out] product of the LoRA path (written, then read back by the base
    GEMM), and in backward d(xa_s) comes out of the input-gradient GEMM instead of reading dy again.
    The same values as y = xn W^T + xa_s B^T, summed in fp32 inside one GEMM."""
    if not _KCAT or norm_w is None or (meta.cdt is not None and meta.cdt != x.dtype):
        return False
    if _group_quants(meta, idx) is None:
        return False
    return all(ts[4 * i] is None and ts[4 * i + 1] is None and ts[4 * i + 2] is not None for i in idx)


def _block_b(ts, idx: list[int], dtype) -> torch.Tensor:
    """[sum out_i, sum r_i] block-diagonal of the B_i in `dtype`, cached until the next optimizer step."""
    return cached_block_diag([ts[4 * i + 3] for i in idx], dtype)


def _kcat_weight(ts, idx: list[int], meta: _Meta, dtype, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """[sum out_i, k + sum r_i]: the dequantized bases in the left k columns, B block-diagonal on the
    right; with the rows of each projection (views)."""
    qs = [meta.quants[i] for i in idx]
    bb = _block_b(ts, idx, dtype)
    w = torch.empty(bb.shape[0], k + bb.shape[1], dtype=dtype, device=bb.device)
    type(qs[0]).dequantize_many(qs, dtype, out=w)
    w[:, k:].copy_(bb)
    return w, list(w.split([q.shape[0] for q in qs]))


def _kcat_input(x, norm_w, meta: _Meta, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([N, k + r] buffer with norm(x) in its left k columns, that view, 1/rms)."""
    k = x.shape[1]
    buf = torch.empty(x.shape[0], k + r, dtype=x.dtype, device=x.device)
    xn, rstd = rms_norm_forward(x, norm_w, meta.eps, meta.offset, meta.use_triton, out=buf[:, :k])
    return buf, xn, rstd


def _kcat_project(buf, xa_s, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    buf[:, buf.shape[1] - xa_s.shape[1]:].copy_(xa_s)
    return [buf @ w.t() for w in rows]


def _kcat_backward(xn, dys, ts, idx: list[int], meta: _Meta, xa_s, need, rows: list[torch.Tensor]):
    """Input gradient (a [N, k] view) and weight grads of a K-concat group; every dy present."""
    k = xn.shape[1]
    sl = _slices(ts, idx)
    grads: dict[int, torch.Tensor | None] = {}
    dbuf = None
    for i, dy, w in zip(idx, dys, rows):
        dbuf = dy @ w if dbuf is None else dbuf.addmm_(dy, w)  # [N, k + r]: dxn | d(xa_s)
        if need[4 * i + 3]:
            grads[4 * i + 3] = _mm_to(dy.t(), xa_s[:, sl[i]], ts[4 * i + 3].dtype)
    dxa = dbuf[:, k:].contiguous()
    want = [i for i in idx if need[4 * i + 2]]
    if want and len(want) == len(idx) and all(ts[4 * i + 2].dtype == ts[4 * idx[0] + 2].dtype for i in idx):
        # every A of the group from one [sum r, N] @ [N, k] GEMM, a block of rows each: one launch
        # (and one split-K workspace) instead of one per projection, ~100 us of CPU per block
        da = _mm_to(dxa.t(), xn, ts[4 * idx[0] + 2].dtype)
        scales = [meta.scales[i] for i in idx]
        if all(sc == scales[0] for sc in scales):
            if scales[0] != 1.0:
                da.mul_(scales[0])
            scales = [1.0] * len(idx)
        for i, sc in zip(idx, scales):
            grads[4 * i + 2] = da[sl[i]].mul_(sc) if sc != 1.0 else da[sl[i]]
    else:
        for i in want:
            da = _mm_to(dxa[:, sl[i]].t(), xn, ts[4 * i + 2].dtype)
            grads[4 * i + 2] = da.mul_(meta.scales[i]) if meta.scales[i] != 1.0 else da
    dxn = dbuf[:, :k]
    dxn.addmm_(dxa, _scaled_a(ts, idx, meta, dxa.dtype))
    return dxn, grads


def _stash(ctx, ts) -> list:
    """Leaf tensors of ts (the parameters) stay on ctx as themselves; the rest go to save_for_backward.
    Why: under saved-tensor hooks (activation offload) save_for_backward hands back a new tensor
    object in backward, and kernels.cast_params' cache of a parameter's bf16 copy lives on the
    parameter object: every adapter was cast again in every offloaded block's backward."""
    ctx.leaves = [t if t is not None and t.is_leaf else None for t in ts]
    return [None if t is not None and t.is_leaf else t for t in ts]


def _unstash(ctx, saved: list) -> list:
    return [leaf if leaf is not None else t for leaf, t in zip(ctx.leaves, saved)]


class FusedLinearsFunction(torch.autograd.Function):
    """(optional RMSNorm) -> n projections of one input."""

    @staticmethod
    def forward(ctx, x, norm_w, meta, *ts):
        idx = list(range(len(ts) // 4))
        if _kcat_ok(x, norm_w, ts, idx, meta):
            a = _scaled_a(ts, idx, meta, x.dtype)
            buf, xn, rstd = _kcat_input(x, norm_w, meta, a.shape[0])
            xa_s = xn @ a.t()
            outs = _kcat_project(buf, xa_s, _kcat_weight(ts, idx, meta, xn.dtype, xn.shape[1])[1])
            del buf
        else:
            xn, rstd = _norm_in(x, norm_w, meta)
            xa_s = _lora_in(xn, ts, idx, meta)
            sl = _slices(ts, idx)
            wcache = _dequant_group(ts, idx, meta, xn.dtype, {})
            outs = [_project(xn, ts, i, meta, xa_s, sl, wcache) for i in idx]
            del wcache
        ctx.meta = meta
        ctx.save_for_backward(x, norm_w, rstd, xa_s, *_stash(ctx, ts))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x, norm_w, rstd, xa_s, *ts = ctx.saved_tensors
        ts = _unstash(ctx, ts)
        meta = ctx.meta
        need = ctx.needs_input_grad
        idx = list(range(len(ts) // 4))
        xn = _norm_in(x, norm_w, meta)[0]
        need_dx = need[0] or (norm_w is not None and need[1])
        if need_dx and all(dy is not None for dy in dys) and _kcat_ok(x, norm_w, ts, idx, meta):
            rows = _kcat_weight(ts, idx, meta, xn.dtype, xn.shape[1])[1]
            dxn, grads = _kcat_backward(xn, dys, ts, idx, meta, xa_s, need[3:], rows)
            del rows
        else:
            wcache = _dequant_group(ts, idx, meta, xn.dtype, {}) if need_dx else None
            dxn, grads = _linears_backward(xn, dys, ts, idx, meta, xa_s, need[3:], need_dx, wcache)
        dx, dnw = _norm_back(dxn, x, norm_w, rstd, meta, need[0], need[1])
        return (dx, dnw, None, *[grads.get(j) for j in range(len(ts))])


class FusedMLPFunction(torch.autograd.Function):
    """(optional RMSNorm) -> gate, up -> act(gate) * up -> down; ts = gate(4) + up(4) + down(4)."""

    @staticmethod
    def forward(ctx, x, norm_w, meta, *ts):
        if _kcat_ok(x, norm_w, ts, [0, 1], meta):
            a = _scaled_a(ts, [0, 1], meta, x.dtype)
            buf, xn, rstd = _kcat_input(x, norm_w, meta, a.shape[0])
            xa_s = xn @ a.t()
            g, u = _kcat_project(buf, xa_s, _kcat_weight(ts, [0, 1], meta, xn.dtype, xn.shape[1])[1])
            del buf, xn
        else:
            xn, rstd = _norm_in(x, norm_w, meta)
            xa_s = _lora_in(xn, ts, [0, 1], meta)
            sl = _slices(ts, [0, 1])
            wcache = _dequant_group(ts, [0, 1], meta, xn.dtype, {})
            g = _project(xn, ts, 0, meta, xa_s, sl, wcache)
            u = _project(xn, ts, 1, meta, xa_s, sl, wcache)
            del wcache
        h = gated_act_forward(g, u, meta.kind, meta.use_triton)
        ha_s = _lora_in(h, ts, [2], meta)
        out = _project(h, ts, 2, meta, ha_s, {2: slice(None)} if ha_s is not None else {})
        ctx.meta = meta
        if meta.recompute:
            g = u = None
        ctx.save_for_backward(x, norm_w, rstd, xa_s, ha_s, g, u, *_stash(ctx, ts))
        return out

    @staticmethod
    def backward(ctx, dout):
        x, norm_w, rstd, xa_s, ha_s, g, u, *ts = ctx.saved_tensors
        ts = _unstash(ctx, ts)
        meta = ctx.meta
        need = ctx.needs_input_grad
        tneed = need[3:]
        kcat = _kcat_ok(x, norm_w, ts, [0, 1], meta)
        if kcat:  # the normalised input lands in the left columns of the [xn | xa_s] buffer
            buf, xn, _ = _kcat_input(x, norm_w, meta, xa_s.shape[1])
        else:
            xn = _norm_in(x, norm_w, meta)[0]
        dout = dout.reshape(-1, dout.shape[-1])
        grads: dict[int, torch.Tensor | None] = {}
        # down projection first (it needs neither gate nor up): d(ha_s) = dout Bd, dh = dout Wd + d(ha_s) (s Ad)
        wd = _weight(ts, 2, meta, dout.dtype)
        if ts[10] is not None:
            bd = ts[11]
            dha = dout @ cast_params([bd], dout.dtype)
            if tneed[11]:
                grads[11] = _mm_to(dout.t(), ha_s, bd.dtype)
            dh = (dha @ _scaled_a(ts, [2], meta, dout.dtype)).addmm_(dout, wd)
        else:
            dha = None
            dh = dout @ wd
        del wd
        need_dx = need[0] or (norm_w is not None and need[1])
        # gate/up dequantized once (one launch) for both the recompute and the input gradient; the two
        # [inter, hidden] weights live until the input gradient is done (the planner's 2x scratch)
        rows = wcache = None
        if kcat and (g is None or need_dx):
            rows = _kcat_weight(ts, [0, 1], meta, xn.dtype, xn.shape[1])[1]
            if g is None:
                g, u = _kcat_project(buf, xa_s, rows)
        elif g is None or need_dx:
            wcache = _dequant_group(ts, [0, 1], meta, xn.dtype, {})
        if g is None:
            sl = _slices(ts, [0, 1])
            g = _project(xn, ts, 0, meta, xa_s, sl, wcache)
            u = _project(xn, ts, 1, meta, xa_s, sl, wcache)
        want_h = (dha is not None and tneed[10]) or tneed[8]
        # dgate/dup overwrite gate/up (recomputed, or saved and needed no more): no new [tokens, inter]
        # buffers at the backward peak. (So this backward can run once: no retain_graph double backward.)
        h, dg, du = gated_act_backward(dh, g, u, meta.kind, meta.use_triton, want_h=want_h, reuse_inputs=True)
        if dha is not None and tneed[10]:
            da = _mm_to(dha.t(), h, ts[10].dtype)
            grads[10] = da.mul_(meta.scales[2]) if meta.scales[2] != 1.0 else da
        if tneed[8]:
            grads[8] = _mm_to(dout.t(), h, ts[8].dtype)
        if tneed[9]:
            grads[9] = dout.sum(0).to(ts[9].dtype)
        del h, dh
        if rows is not None and need_dx:
            dxn, g2 = _kcat_backward(xn, [dg, du], ts, [0, 1], meta, xa_s, tneed, rows)
        else:
            dxn, g2 = _linears_backward(xn, [dg, du], ts, [0, 1], meta, xa_s, tneed, need_dx, wcache)
        del wcache, rows
        grads.update(g2)
        dx, dnw = _norm_back(dxn, x, norm_w, rstd, meta, need[0], need[1])
        return (dx, dnw, None, *[grads.get(j) for j in range(len(ts))])


def _flat_specs(specs: list[LinearSpec]) -> tuple[list, list[float], list, list]:
    ts: list = []
    for s in specs:
        if s.weight is None and s.weight_fn is None:
            raise ValueError("LinearSpec needs a weight or a weight_fn")
        ts.extend(s.tensors())
    return ts, [float(s.scale) for s in specs], [s.weight_fn for s in specs], [s.quant for s in specs]


@torch.compiler.disable
def fused_linears(x: torch.Tensor, specs: list[LinearSpec], norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, offset: float = 0.0, use_triton: bool | None = None) -> list[torch.Tensor]:
    """[norm(x)] -> [x W_i^T + b_i + s_i x A_i^T B_i^T for each spec]; x [..., in] -> list of [..., out_i]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    tri = use_triton_for(x2, use_triton) if norm_weight is not None else False
    ts, scales, fns, quants = _flat_specs(specs)
    meta = _Meta(eps, float(offset), scales, fns, tri, cdt=compute_dtype(x2), quants=quants)
    outs = FusedLinearsFunction.apply(x2, norm_weight, meta, *ts)
    return [o.view(*lead, o.shape[-1]) for o in outs]


@torch.compiler.disable
def fused_mlp(x: torch.Tensor, gate: LinearSpec, up: LinearSpec, down: LinearSpec, kind: str = "silu",
              norm_weight: torch.Tensor | None = None, eps: float = 1e-6, offset: float = 0.0,
              recompute: bool = False, use_triton: bool | None = None) -> torch.Tensor:
    """[norm(x)] -> down(act(gate(.)) * up(.)); recompute=True keeps no [tokens, intermediate] tensor."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    tri = use_triton_for(x2, use_triton)
    ts, scales, fns, quants = _flat_specs([gate, up, down])
    meta = _Meta(eps, float(offset), scales, fns, tri, kind, bool(recompute), compute_dtype(x2), quants)
    out = FusedMLPFunction.apply(x2, norm_weight, meta, *ts)
    return out.view(*lead, out.shape[-1])


def lora_linear(x: torch.Tensor, spec: LinearSpec) -> torch.Tensor:
    """One projection with the fused LoRA backward (e.g. o_proj)."""
    return fused_linears(x, [spec])[0]
