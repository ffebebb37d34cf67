"""Triton NF4 dequantization (layout in nf4.py). One program expands BLOCK packed bytes.

Kept to the basic `tl` ops (load/store with masks, integer shifts, gathers from a small table) so it
runs on Triton 3.2+ and under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4 import BLOCK, DYNAMIC_CODE_VALUES, NESTED_BLOCK, NF4_CODE_VALUES

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    key = (name, device)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return t


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, code2_ptr, out_ptr,
                        n_bytes, BYTES: tl.constexpr, DOUBLE: tl.constexpr,
                        BYTES_PER_SCALE: tl.constexpr, SCALES_PER_SCALE2: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    mask = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    hi = (byte >> 4) & 15
    lo = byte & 15
    block = offs // BYTES_PER_SCALE
    if DOUBLE:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(
            absmax2_ptr + block // SCALES_PER_SCALE2, mask=mask, other=0.0) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    v_hi = tl.load(code_ptr + hi, mask=mask, other=0.0) * scale
    v_lo = tl.load(code_ptr + lo, mask=mask, other=0.0) * scale
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + 2 * offs, v_hi.to(out_ty), mask=mask)
    tl.store(out_ptr + 2 * offs + 1, v_lo.to(out_ty), mask=mask)


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, numel: int, dtype: torch.dtype,
                          absmax2: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    n_bytes = packed.numel()
    out = torch.empty(2 * n_bytes, dtype=dtype, device=packed.device)
    double = absmax.dtype == torch.uint8
    code = _table("nf4", NF4_CODE_VALUES, packed.device)
    code2 = _table("dyn", DYNAMIC_CODE_VALUES, packed.device)
    dummy = code
    per_prog = 1024
    grid = (triton.cdiv(n_bytes, per_prog),)
    _nf4_dequant_kernel[grid](
        packed, absmax, absmax2 if double else dummy, offset if double else dummy, code, code2, out, n_bytes,
        BYTES=per_prog, DOUBLE=double, BYTES_PER_SCALE=BLOCK // 2, SCALES_PER_SCALE2=NESTED_BLOCK,
    )
    return out[:numel]
