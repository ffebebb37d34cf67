"""k-quant blocks (Q4_K, Q5_K, Q6_K) in the byte layout llama.cpp reads, for `--quant q4_k_m | q5_k_m | q6_k`.

Why by hand: the `gguf` package reads every k-quant but writes none, and llama.cpp's own quantizer is
C++ that the exporter must not need a build of. The layouts are llama.cpp's (the tests read our blocks
back with gguf's dequantizers); how scales are chosen is ours: per sub-block a few candidate scales,
each refit by least squares to the codes it gives, the one with the least squared error kept; then the
sub-block scales get 6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) codes against one f16 scale per block of 256.

  Q4_K  256 values = 8 sub-blocks of 32: x ~ d*sc[j]*q - dmin*m[j], q in 0..15, sc and m 6-bit codes.
        144 bytes: d (f16), dmin (f16), 12 bytes of packed sc/m, 128 bytes of nibbles (byte 32g+l:
        sub-block 2g in the low nibble, 2g+1 in the high one, at position l).
  Q5_K  as Q4_K with q in 0..31: 176 bytes, the fifth bits in 32 bytes (byte l, bit j: sub-block j,
        position l) between the scale codes and the nibbles.
  Q6_K  256 values = 16 sub-blocks of 16: x ~ d*sc[j]*(q - 32), q in 0..63, sc int8. 210 bytes: 128
        bytes of low nibbles (byte 64h+l: values 128h+l and 128h+64+l), 64 bytes of high bit pairs
        (byte 32h+l, bits 2s: value 128h+32s+l), 16 scale bytes, d (f16).

Rows must be a multiple of 256 long; the GGUF writer falls back to Q5_0 / Q5_1 / Q8_0 for others, as llama.cpp.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
_CHUNK_BLOCKS = 1 << 16  # blocks of 256 per pass: ~64 MiB of fp32 values and a few temporaries of that size


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _fit_min_scale(x: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """Q4_K / Q5_K codes for [nb, 8, 32] values: x ~ d*sc*q - dmin*m, q in 0..top. Returns d, dmin [nb]
    (f16 values), sc, m [nb, 8] and q [nb, 8, 32] (uint8)."""
    lo = x.amin(-1).clamp(max=0.0)  # the min is subtracted: it may not be above 0
    span = x.amax(-1) - lo
    best_err = torch.full_like(lo, float("inf"))
    best_a, best_mn = span / top, lo
    n, sx, sxx = 32.0, x.sum(-1), (x * x).sum(-1)
    for c in [k / 4 for k in range(-4, 9)]:  # codes from a range top + c wide (c in -1..2), each refit
        iscale = torch.where(span > 0, (top + c) / span, torch.zeros_like(span))
        q = ((x - lo[..., None]) * iscale[..., None]).round_().clamp_(0, top)
        sq, sqq, sqx = q.sum(-1), (q * q).sum(-1), (q * x).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        a = torch.where(ok, (n * sqx - sq * sx) / safe, best_a)
        mn = torch.where(ok, (sqq * sx - sq * sqx) / safe, best_mn)
        pos = mn > 0  # the offset must stay <= 0: refit the scale alone
        a = torch.where(pos, sqx / sqq.clamp(min=1e-30), a).clamp(min=0)
        mn = mn.clamp(max=0)
        # sum((a q + mn - x)^2), expanded over the sums above (no second pass over the values)
        err = a * a * sqq + 2 * a * mn * sq - 2 * a * sqx + n * mn * mn - 2 * mn * sx + sxx
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_a, best_mn = torch.where(better, a, best_a), torch.where(better, mn, best_mn)
    mins = -best_mn
    d = _f16(best_a.amax(-1) / 63)
    dmin = _f16(mins.amax(-1) / 63)
    sc = torch.where(d[:, None] > 0, best_a / d[:, None].clamp(min=1e-30), 0).round().clamp(0, 63)
    m = torch.where(dmin[:, None] > 0, mins / dmin[:, None].clamp(min=1e-30), 0).round().clamp(0, 63)
    step, off = d[:, None] * sc, dmin[:, None] * m
    q = torch.where(step[..., None] > 0, (x + off[..., None]) / step[..., None].clamp(min=1e-30), 0)
    return d, dmin, sc.to(torch.uint8), m.to(torch.uint8), q.round().clamp(0, top).to(torch.uint8)


def _min_scale_head(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """d, dmin and the 12 bytes of 6-bit sc / m codes that open a Q4_K or Q5_K block."""
    codes = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                       (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], dim=1)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), codes], dim=1)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[nb, 8, 32] 4-bit codes -> 128 bytes: sub-block 2g in the low nibbles of bytes 32g.., 2g+1 high."""
    q = (q & 0xF).view(q.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """[nb, 256] fp32 -> [nb, 144] uint8."""
    d, dmin, sc, m, q = _fit_min_scale(x.view(-1, 8, 32), 15)
    return torch.cat([_min_scale_head(d, dmin, sc, m), _nibbles(q)], dim=1)


def _q5_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """[nb, 256] fp32 -> [nb, 176] uint8: the Q4_K head, 32 bytes of fifth bits (byte l, bit j: sub-block j,
    position l), then the low nibbles as Q4_K lays them out."""
    d, dmin, sc, m, q = _fit_min_scale(x.view(-1, 8, 32), 31)
    high = (q >> 4).to(torch.int32) << torch.arange(8, dtype=torch.int32, device=q.device)[None, :, None]
    return torch.cat([_min_scale_head(d, dmin, sc, m), high.sum(1).to(torch.uint8), _nibbles(q)], dim=1)


def _q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """[nb, 256] fp32 -> [nb, 210] uint8."""
    nb = x.shape[0]
    x = x.view(nb, 16, 16)
    idx = x.abs().argmax(-1, keepdim=True)
    peak = x.gather(-1, idx).squeeze(-1)  # the signed value of largest magnitude maps to -32
    best_err = torch.full_like(peak, float("inf"))
    best_s = -peak / 32
    for c in (-1.0, -0.5, 0.0, 0.5, 1.0):
        iscale = torch.where(peak != 0, -(32 + c) / peak, torch.zeros_like(peak))
        q = (x * iscale[..., None]).round_().clamp_(-32, 31)
        sqq, sqx = (q * q).sum(-1), (q * x).sum(-1)
        s = torch.where(sqq > 0, sqx / sqq.clamp(min=1e-30), best_s)
        err = s * s * sqq - 2 * s * sqx  # sum((s q - x)^2) less sum(x^2), the same for every candidate
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    d = _f16(best_s.abs().amax(-1) / 127)
    sc = torch.where(d[:, None] > 0, best_s / d[:, None].clamp(min=1e-30), 0).round().clamp(-128, 127)
    step = d[:, None] * sc
    q = torch.where(step[..., None] != 0, x / torch.where(step == 0, 1.0, step)[..., None], 0)
    q = (q.round().clamp(-32, 31) + 32).to(torch.uint8).view(nb, 2, 4, 32)  # [block, half, quarter, l]

    low = q & 0xF
    ql = (low[:, :, :2].reshape(nb, 2, 64) | (low[:, :, 2:].reshape(nb, 2, 64) << 4)).reshape(nb, 128)
    high = q >> 4
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(nb, 64)
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh, scales, _f16_bytes(d)], dim=1)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).view(torch.uint8).view(-1, 2)  # little-endian, as GGUF stores it


def quantize_k(t: torch.Tensor, kind: str) -> np.ndarray:
    """A [rows, cols] tensor (cols % 256 == 0) -> uint8 [rows, cols / 256 * bytes per block] for GGUF."""
    if t.ndim != 2 or t.shape[1] % QK_K:
        raise ValueError(f"{kind} needs rows a multiple of {QK_K} long, got shape {tuple(t.shape)}")
    fn = {"q4_k": _q4_k_blocks, "q5_k": _q5_k_blocks, "q6_k": _q6_k_blocks}[kind]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    blocks = t.detach().reshape(-1, QK_K)
    out = torch.empty(blocks.shape[0], BYTES[kind], dtype=torch.uint8)
    for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        part = blocks[i:i + _CHUNK_BLOCKS].to(dev, torch.float32)
        out[i:i + _CHUNK_BLOCKS] = fn(part).cpu()
    return out.view(t.shape[0], -1).numpy()
