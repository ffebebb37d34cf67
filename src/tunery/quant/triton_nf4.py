"""Triton NF4 dequantization (layout in nf4.py).

One program expands SCALES blocks of 64 weights (32 packed bytes each) as a [SCALES, 32] tile: one
scale load per block (not per byte), the two nibbles looked up in the 16-entry code table, and
`tl.join` + reshape put high and low nibble values side by side so the [SCALES, 64] output is stored
contiguously (wide, coalesced stores). Dequantization is memory-bound: 0.5 byte in and 2 bytes out
per weight, so the store pattern decides its speed.

Kept to basic `tl` ops (masked loads/stores, shifts, gathers from a small table, join) so it
runs on Triton 3.2+ and under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4 import BLOCK, DYNAMIC_CODE_VALUES, NESTED_BLOCK, NF4_CODE_VALUES

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}
HALF = BLOCK // 2  # packed bytes per scale


def _table(name: str, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    key = (name, device)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return t


@triton.jit
def _dequant_blocks(pid, packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, code2_ptr, out_ptr, n_blocks,
                    row_len, row_stride, SCALES: tl.constexpr, HALF: tl.constexpr, DOUBLE: tl.constexpr,
                    SCALES_PER_SCALE2: tl.constexpr):
    blk = pid.to(tl.int64) * SCALES + tl.arange(0, SCALES)  # [SCALES] block indices
    bmask = blk < n_blocks
    if DOUBLE:
        q = tl.load(absmax_ptr + blk, mask=bmask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=bmask, other=0.0) * tl.load(
            absmax2_ptr + blk // SCALES_PER_SCALE2, mask=bmask, other=0.0) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=bmask, other=0.0)
    offs = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [SCALES, HALF] byte offsets
    mask = bmask[:, None]
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    v_hi = tl.load(code_ptr + ((byte >> 4) & 15)) * scale[:, None]
    v_lo = tl.load(code_ptr + (byte & 15)) * scale[:, None]
    # [SCALES, HALF, 2] -> [SCALES, 2 * HALF]: element 2i from the high nibble (tl.interleave's effect,
    # spelled with builtins so the CPU interpreter runs it too)
    vals = tl.reshape(tl.join(v_hi, v_lo), (SCALES, 2 * HALF))
    # element e = blk * 64 + j sits at row e // row_len, column e % row_len of an output whose rows are
    # row_stride apart (row_len a multiple of 64, so a block never straddles two rows)
    first = blk * (2 * HALF)
    start = (first // row_len) * row_stride + first % row_len
    out_offs = start[:, None] + tl.arange(0, 2 * HALF)[None, :]
    tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, code2_ptr, out_ptr,
                        n_blocks, SCALES: tl.constexpr, HALF: tl.constexpr, DOUBLE: tl.constexpr,
                        SCALES_PER_SCALE2: tl.constexpr):
    _dequant_blocks(tl.program_id(0), packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, code_ptr, code2_ptr, out_ptr,
                    n_blocks, n_blocks * 2 * HALF, 0, SCALES, HALF, DOUBLE, SCALES_PER_SCALE2)


@triton.jit
def _nf4_dequant3_kernel(p0, a0, s0, f0, o0, n0, p1, a1, s1, f1, o1, n1, p2, a2, s2, f2, o2, n2,
                         code_ptr, code2_ptr, progs0, progs1, row_len, row_stride,
                         SCALES: tl.constexpr, HALF: tl.constexpr, DOUBLE: tl.constexpr,
                         SCALES_PER_SCALE2: tl.constexpr):
    """Up to three weights in one launch (q/k/v, gate/up): the first progs0 programs expand weight 0,
    the next progs1 weight 1, the rest weight 2."""
    pid = tl.program_id(0)
    if pid < progs0:
        _dequant_blocks(pid, p0, a0, s0, f0, code_ptr, code2_ptr, o0, n0, row_len, row_stride,
                        SCALES, HALF, DOUBLE, SCALES_PER_SCALE2)
    elif pid < progs0 + progs1:
        _dequant_blocks(pid - progs0, p1, a1, s1, f1, code_ptr, code2_ptr, o1, n1, row_len, row_stride,
                        SCALES, HALF, DOUBLE, SCALES_PER_SCALE2)
    else:
        _dequant_blocks(pid - progs0 - progs1, p2, a2, s2, f2, code_ptr, code2_ptr, o2, n2, row_len, row_stride,
                        SCALES, HALF, DOUBLE, SCALES_PER_SCALE2)


_SCALES = 64  # blocks per program: 4096 weights, 2 KiB in, 8 KiB out (bf16)


def dequantize_nf4_many_triton(parts: list[tuple], outs: list[torch.Tensor], row_len: int = 0,
                               row_stride: int = 0, scales: int = _SCALES, num_warps: int = 4) -> None:
    """Dequantize 2 or 3 weights in one launch. parts[i] = (packed, absmax, absmax2, offset) of the
    same kind (all double-quantized or none); outs[i] where weight i goes: flat (its blocks x 64), or
    with row_len > 0 the first of rows of row_len values placed row_stride apart (row_len % 64 == 0).
    `scales` (blocks of 64 per program, a power of 2) and `num_warps`: the launch shape
    (benchmarks/dequant.py --sweep times the choices)."""
    double = parts[0][1].dtype == torch.uint8
    dev = parts[0][0].device
    code = _table("nf4", NF4_CODE_VALUES, dev)
    code2 = _table("dyn", DYNAMIC_CODE_VALUES, dev)
    args, progs = [], []
    for (packed, absmax, absmax2, offset), out in zip(parts, outs):
        nb = packed.numel() // HALF
        progs.append(triton.cdiv(nb, scales))
        args += [packed, absmax, absmax2 if double else code, offset if double else code, out, nb]
    if len(parts) == 2:
        args += args[6:12]  # a third slot no program reaches
    if row_len <= 0:  # flat: one "row" as long as everything
        row_len = row_stride = sum(p[0].numel() for p in parts) * 2
    _nf4_dequant3_kernel[(sum(progs),)](*args, code, code2, progs[0], progs[1], row_len, row_stride,
                                       SCALES=scales, HALF=HALF, DOUBLE=double, SCALES_PER_SCALE2=NESTED_BLOCK,
                                       num_warps=num_warps)


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, numel: int, dtype: torch.dtype,
                          absmax2: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    n_blocks = packed.numel() // HALF
    out = torch.empty(n_blocks * BLOCK, dtype=dtype, device=packed.device)
    double = absmax.dtype == torch.uint8
    code = _table("nf4", NF4_CODE_VALUES, packed.device)
    code2 = _table("dyn", DYNAMIC_CODE_VALUES, packed.device)
    scales = _SCALES
    grid = (triton.cdiv(n_blocks, scales),)
    _nf4_dequant_kernel[grid](
        packed, absmax, absmax2 if double else code, offset if double else code, code, code2, out, n_blocks,
        SCALES=scales, HALF=HALF, DOUBLE=double, SCALES_PER_SCALE2=NESTED_BLOCK,
    )
    return out[:numel]
