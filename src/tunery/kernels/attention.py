"""Document-isolated causal attention for padding-free rows.

A batch is one flat row per micro-batch: documents are told apart by `cu_seqlens` (cumulative
lengths). On CPU the reference runs SDPA per document. On a GPU (bf16/fp16):

- "flash": PyTorch's own FlashAttention-2 varlen kernels (`aten::_flash_attention_forward` with
  cu_seqlens, the op behind `torch.nn.attention.varlen`), GQA and sliding windows included;
- "flex": FlexAttention with a block mask built from cu_seqlens (document + causal + window) and a
  tanh score_mod for soft-capping (Gemma 2); used when flash cannot do the job;
- "dense": when every row is exactly one document (no packing), SDPA over [rows, heads, T, D]
  with cuDNN's fused attention first (faster than FlashAttention-2 on Hopper);
- "sdpa": the per-document reference.

`backend="auto"` picks dense, then flash, then flex, then sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels_enabled


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


# ---------------------------------------------------------------------------------------------- flash


def _flash_args() -> set[str] | None:
    try:
        return {a.name for a in torch.ops.aten._flash_attention_forward.default._schema.arguments}
    except Exception:
        return None


_FLASH_ARGS = _flash_args()


def flash_supports(q: torch.Tensor, window: int | None) -> bool:
    if _FLASH_ARGS is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    d = q.shape[-1]
    if d % 8 or d > 256:
        return False
    return window is None or "window_size_left" in _FLASH_ARGS


def _window_kw(scale: float, window: int | None) -> dict:
    kw: dict = {"scale": scale}
    if window is not None:
        kw["window_size_left"] = int(window) - 1  # keys with q - k < window, as the reference mask
        kw["window_size_right"] = 0
    return kw


class FlashVarlenFunction(torch.autograd.Function):
    """Causal varlen FlashAttention-2; saves q, k, v, out and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, window):
        kw = _window_kw(scale, window)
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, **kw)
        # no dropout: the rng outputs only have to be valid tensors for the backward call
        rng = rng if isinstance(rng, torch.Tensor) else torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = unused if isinstance(unused, torch.Tensor) else torch.empty(0, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng, unused)
        ctx.cfg = (max_seqlen, kw)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        max_seqlen, kw = ctx.cfg
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do.contiguous(), q, k, v, out, lse, cu, cu, max_seqlen, max_seqlen, 0.0, True, rng, unused, **kw)
        return dq, dk, dv, None, None, None, None


@torch.compiler.disable
def flash_varlen(q, k, v, cu_seqlens, max_seqlen: int, scale: float, window: int | None = None) -> torch.Tensor:
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return FlashVarlenFunction.apply(q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), float(scale), window)


# ----------------------------------------------------------------------------------------------- flex

_flex_fns: dict = {}
_mask_cache: dict = {}


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception:
        return False
    return True


def _flex(cuda: bool):
    """FlexAttention compiled for CUDA (uncompiled it materialises the scores); eager on CPU (tests)."""
    if cuda not in _flex_fns:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_fns[cuda] = torch.compile(flex_attention) if cuda else flex_attention
    return _flex_fns[cuda]


@torch.compiler.disable
def document_block_mask(cu_seqlens: torch.Tensor, n: int, window: int | None, device):
    """Block mask: same document, causal, and (when set) q - k < window. Cached per cu_seqlens tensor."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = window
    hit = _mask_cache.get(key)
    if hit is not None and hit[0] is cu_seqlens and hit[1] == cu_seqlens._version and hit[2] == n:
        return hit[3]
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    doc = torch.searchsorted(cu[1:], torch.arange(n, device=device), right=True)

    if window is None:
        def mask_mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)
    else:
        def mask_mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki) & (qi - ki < window)

    mask = create_block_mask(mask_mod, None, None, n, n, device=device)
    _mask_cache[key] = (cu_seqlens, cu_seqlens._version, n, mask)
    return mask


_softcap_mods: dict = {}


def _softcap_mod(cap: float):
    """One score_mod function per cap value, so compiled flex sees the same function every call."""
    if cap not in _softcap_mods:
        def score_mod(score, b, h, qi, ki):
            return torch.tanh(score / cap) * cap

        _softcap_mods[cap] = score_mod
    return _softcap_mods[cap]


def flex_varlen(q, k, v, cu_seqlens, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
    n = q.shape[0]
    mask = document_block_mask(cu_seqlens, n, window, q.device)
    score_mod = _softcap_mod(float(softcap)) if softcap is not None else None
    qq, kk, vv = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = _flex(q.is_cuda)(qq, kk, vv, score_mod=score_mod, block_mask=mask, scale=scale,
                  enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


# --------------------------------------------------------------------------------------------- choose


def pick_backend(q: torch.Tensor, window: int | None, softcap: float | None) -> str:
    if not q.is_cuda or not kernels_enabled() or q.dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    if softcap is None and flash_supports(q, window):
        return "flash"
    if flex_available():
        return "flex"
    return "sdpa"


def one_doc_per_row(n: int, cu_seqlens: torch.Tensor, max_seqlen: int | None) -> int | None:
    """Rows of the flat stream when every row is exactly one document, else None. Decided from
    shapes and the host-side max_seqlen only (no device sync): rows always start a document, so
    b = len(cu_seqlens) - 1 documents of at most max_seqlen tokens covering n tokens are b rows of
    n / b tokens each exactly when max_seqlen == n / b."""
    b = cu_seqlens.numel() - 1
    if b < 1 or max_seqlen is None or n % b or int(max_seqlen) != n // b:
        return None
    return b


_DENSE_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]


_CUDNN_DIRECT = [True]


def dense_causal(q, k, v, rows: int, scale: float) -> torch.Tensor:
    """Causal attention over `rows` equal rows with SDPA, cuDNN's kernel first. On Hopper it runs
    forward + backward of 2 x 2048 tokens (32/8 heads, d 128) in 0.72 ms against 1.24 ms for the
    FlashAttention-2 varlen kernels (benchmarks/RESULTS.md); varlen input has no cuDNN path in torch."""
    n, h, d = q.shape
    t = n // rows
    qq, kk, vv = (x.view(rows, t, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
    if q.is_cuda and _CUDNN_DIRECT[0]:
        # the cuDNN op itself (it has its autograd formula): `with sdpa_kernel(...)` costs ~40 us of
        # CPU per call, once per block in a forward that waits on the CPU. Any refusal (shape, build,
        # device) turns this off for the process and SDPA picks the backend as below.
        try:
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(qq, kk, vv, None, True, 0.0, True, False,
                                                                     scale=scale)[0]
            return out.transpose(1, 2).reshape(n, h, d)
        except RuntimeError:
            _CUDNN_DIRECT[0] = False
    with sdpa_kernel(_DENSE_ORDER, set_priority=True):
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=h != k.shape[1])
    return out.transpose(1, 2).reshape(n, h, d)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int | None, scale: float, window=None, softcap=None,
                     backend: str = "auto"):
    """q [N, H, D], k/v [N, Hkv, D] (H a multiple of Hkv) -> [N, H, D], causal inside each document.

    backend "auto": "dense" (SDPA, cuDNN first) when every row is one document (no packing), else
    flash varlen, flex, or the per-document reference."""
    if backend == "auto":
        backend = pick_backend(q, window, softcap)
        if backend == "flash" and window is None and one_doc_per_row(q.shape[0], cu_seqlens, max_seqlen):
            backend = "dense"
    if backend == "dense":
        rows = one_doc_per_row(q.shape[0], cu_seqlens, max_seqlen)
        if rows is None or window is not None or softcap is not None:
            raise ValueError("the dense backend needs one document per row, no window and no soft-capping")
        return dense_causal(q, k, v, rows, scale)
    if backend == "flash":
        if softcap is not None:
            raise ValueError("the flash backend has no soft-capping: use backend 'flex' or 'auto'")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return flash_varlen(q, k, v, cu_seqlens, max_seqlen, scale, window)
    if backend == "flex":
        return flex_varlen(q, k, v, cu_seqlens, scale, window, softcap)
    if backend in ("sdpa", "reference"):
        return varlen_attention_reference(q, k, v, cu_seqlens, scale, window, softcap)
    raise ValueError(f"unknown attention backend {backend!r} (auto, dense, flash, flex, sdpa)")
