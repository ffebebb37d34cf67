"""Linear cross-entropy from hidden states: the LM head and the loss in chunks, never all logits at once.

The fused version (`LinearCrossEntropyFunction`) does the backward inside the forward: per chunk it
computes the logits, the loss and at once the gradient wrt the logits (softmax - onehot, written over
the logits buffer), then grad_hidden = dlogits @ W and grad_W += dlogits^T @ h. Only those gradients
are kept; backward just scales them by the incoming gradient. Peak extra memory is one chunk of
logits. `TokenLogprobsFunction` (DPO/GRPO per-token log-probs) keeps hidden states and recomputes the
chunk logits in backward, since its incoming gradient is per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import compute_dtype, host_copy, rows_are_static, use_triton_for

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is optional
    triton = None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_loss(h, weight, labels, softcap, ignore_index, z_loss):
    logits = _chunk_logits(h, weight, softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if z_loss:
        lse = torch.logsumexp(logits, -1)
        loss = loss + z_loss * (lse.pow(2) * (labels != ignore_index)).sum()
    return loss


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    softcap: float | None = None, z_loss: float = 0.0, chunk_size: int = 4096,
) -> torch.Tensor:
    """Summed token loss. hidden [N, H], labels [N] already shifted. Chunks are recomputed in backward."""
    total = hidden.new_zeros((), dtype=torch.float32)
    keep = (labels != ignore_index).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return total + 0.0 * hidden.sum()
    hidden, labels = hidden[keep], labels[keep]
    for s in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[s : s + chunk_size], labels[s : s + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, weight, y, softcap, ignore_index, z_loss, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, y, softcap, ignore_index, z_loss)
    return total


def _chunk_logps(h, weight, labels, softcap):
    logits = _chunk_logits(h, weight, softcap)
    return torch.gather(logits.log_softmax(-1), 1, labels[:, None]).squeeze(1)


def token_logprobs_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    softcap: float | None = None, chunk_size: int = 4096,
) -> torch.Tensor:
    """Per-token log p(label) [N] (0 where ignored), chunked; for DPO-style sequence log-probs."""
    out = hidden.new_zeros(labels.shape, dtype=torch.float32)
    keep = (labels != ignore_index).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return out + 0.0 * hidden.sum()
    hk, yk = hidden[keep], labels[keep]
    parts = []
    for s in range(0, hk.shape[0], chunk_size):
        h, y = hk[s : s + chunk_size], yk[s : s + chunk_size]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, h, weight, y, softcap, use_reentrant=False))
        else:
            parts.append(_chunk_logps(h, weight, y, softcap))
    return out.index_put((keep,), torch.cat(parts))


if triton is not None:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _ce_rows_kernel(LOGITS, stride_l, LABELS, LOSS, SCALE, n_cols, ignore_index, softcap, z_loss,
                        HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
                        BLOCK_V: tl.constexpr):
        """One row per program. loss = lse - x[label] + z*lse^2 (x soft-capped when HAS_SOFTCAP).

        With WRITE_GRAD the row is overwritten by d loss / d raw logits (times SCALE[row] if given).
        A row whose label is ignore_index gets loss 0 and a zero gradient.
        """
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_l
        raw_label = tl.load(LABELS + row)
        valid = raw_label != ignore_index
        label = tl.where(valid, raw_label, 0)
        m = -float("inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * _tanh(x / softcap)
            x = tl.where(mask, x, -float("inf"))
            new_m = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
            m = new_m
        lse = m + tl.log(d)
        x_label = tl.load(ptr + label).to(tl.float32)
        if HAS_SOFTCAP:
            x_label = softcap * _tanh(x_label / softcap)
        tl.store(LOSS + row, tl.where(valid, lse - x_label + z_loss * lse * lse, 0.0))
        if WRITE_GRAD:
            scale = tl.where(valid, 1.0, 0.0)
            if HAS_SCALE:
                scale = scale * tl.load(SCALE + row).to(tl.float32)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < n_cols
                x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(x / softcap)
                    x = softcap * t
                p = tl.exp(x - lse)
                g = p * (1.0 + 2.0 * z_loss * lse) - tl.where(cols == label, 1.0, 0.0)
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                tl.store(ptr + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


def _ce_rows(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None, z_loss: float, write_grad: bool,
             scale: torch.Tensor | None, use_triton: bool, ignore_index: int = -100) -> torch.Tensor:
    """Per-row loss (fp32) of a [C, V] logits chunk; with write_grad the chunk becomes d loss / d logits.

    Rows labelled ignore_index give loss 0 and zero gradient."""
    if use_triton:
        n_rows, n_cols = logits.shape
        loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
        if n_rows == 0:
            return loss
        block_v = min(triton.next_power_of_2(n_cols), 4096)
        _ce_rows_kernel[(n_rows,)](logits, logits.stride(0), labels, loss, scale if scale is not None else loss,
                                   n_cols, int(ignore_index), float(softcap or 1.0), float(z_loss),
                                   HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad,
                                   HAS_SCALE=scale is not None, BLOCK_V=block_v, num_warps=8)
        return loss
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    x = logits.float()
    if softcap is not None:
        t = torch.tanh(x / softcap)
        x = t * softcap
    lse = torch.logsumexp(x, -1)
    loss = (lse - x.gather(1, safe[:, None]).squeeze(1) + z_loss * lse * lse) * valid
    if write_grad:
        g = torch.softmax(x, -1) * (1 + 2 * z_loss * lse)[:, None]
        g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
        if softcap is not None:
            g = g * (1 - t * t)
        g = g * (valid[:, None] if scale is None else (scale * valid)[:, None])
        logits.copy_(g)
    return loss


def _chunk_rows(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    """Rows per chunk: about 128 MiB of bf16 logits, between 128 and 8192 rows."""
    if chunk_size:
        return chunk_size
    rows = (128 << 20) // max(1, 2 * vocab)
    return max(128, min(8192, 1 << max(rows, 1).bit_length() - 1))


def _kept(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int, host: torch.Tensor | None = None):
    """(keep index or None, hidden rows, labels) to run through the head. Ignored rows are dropped only
    when they are many (prompt-masked SFT): a few (row ends) cost less computed and masked than copied.

    `host`: the labels' values on the CPU (kernels.host_copy), when the caller has them: the count is
    then made there, with no device-to-host sync (which would stop the CPU from queueing the backward
    and the next step while the GPU finishes this forward)."""
    if rows_are_static():  # under CUDA-graph capture: the same rows whatever the labels (masked, not dropped)
        return None, hidden, labels
    if host is not None and host.shape == labels.shape:
        mask = host != ignore_index
        if int(mask.sum()) >= 0.75 * labels.numel():
            return None, hidden, labels
        keep = mask.nonzero().squeeze(-1)
        keep = keep.pin_memory().to(labels.device, non_blocking=True) if labels.is_cuda else keep.to(labels.device)
    else:
        keep = (labels != ignore_index).nonzero().squeeze(-1)
        if keep.numel() >= 0.75 * labels.numel():
            return None, hidden, labels
    return keep, hidden.index_select(0, keep), labels.index_select(0, keep)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed token loss of hidden [N, H] through weight [V, H]; gradients computed during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, z_loss, chunk_size, use_triton, host=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Under autocast (fp32 master weights, full fine-tuning) the matmuls run in the autocast dtype,
        # cast here once; autocast is off inside so the out=/in-place accumulations keep their dtypes.
        cdt = compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            keep, h_all, y_all = _kept(hidden, labels, ignore_index, host)
            h_all = h_all.to(cdt)
            n = h_all.shape[0]
            total = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_h = torch.empty_like(h_all) if need_h else None
            grad_w = torch.zeros_like(weight) if need_w else None
            w = weight if weight.dtype == cdt else weight.to(cdt)
            step = _chunk_rows(n, weight.shape[0], chunk_size)
            for s in range(0, n, step):
                h, y = h_all[s : s + step], y_all[s : s + step]
                logits = h @ w.t()
                total += _ce_rows(logits, y, softcap, z_loss, need_h or need_w, None, use_triton, ignore_index).sum()
                if need_h:
                    torch.mm(logits, w, out=grad_h[s : s + step])
                if need_w:
                    grad_w.addmm_(logits.t().to(grad_w.dtype), h.to(grad_w.dtype))
            if need_h:
                grad_h = grad_h.to(hidden.dtype)
                if keep is not None:
                    grad_h = torch.zeros_like(hidden).index_copy_(0, keep, grad_h)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * g.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * g.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


class TokenLogprobsFunction(torch.autograd.Function):
    """Per-token log p(label) [N] (0 where ignored); backward recomputes the chunk logits."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, chunk_size, use_triton, host=None):
        keep, h_all, y_all = _kept(hidden, labels, ignore_index, host)
        out = torch.zeros(labels.shape, device=hidden.device, dtype=torch.float32)
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        step = _chunk_rows(h_all.shape[0], weight.shape[0], chunk_size)
        parts = [-_ce_rows(h @ w.t(), y, softcap, 0.0, False, None, use_triton, ignore_index)
                 for h, y in zip(h_all.split(step), y_all.split(step))]
        logp = torch.cat(parts) if parts else out[:0]
        if keep is None:
            out = logp
        else:
            out.index_copy_(0, keep, logp)
        ctx.save_for_backward(hidden, weight, labels, keep)
        ctx.cfg = (softcap, step, use_triton, ignore_index)
        return out

    @staticmethod
    def backward(ctx, g):
        hidden, weight, labels, keep = ctx.saved_tensors
        softcap, step, use_triton, ignore_index = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h_all, y_all, g_all = hidden, labels, g.float()
        if keep is not None:
            h_all, y_all, g_all = hidden.index_select(0, keep), labels.index_select(0, keep), g_all.index_select(0, keep)
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        grad_h = torch.empty_like(h_all) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for s in range(0, h_all.shape[0], step):
            h, y = h_all[s : s + step], y_all[s : s + step]
            logits = h @ w.t()
            _ce_rows(logits, y, softcap, 0.0, True, (-g_all[s : s + step]).contiguous(), use_triton, ignore_index)
            if need_h:
                torch.mm(logits, w, out=grad_h[s : s + step])
            if need_w:
                grad_w.addmm_(logits.t().to(grad_w.dtype), h.to(grad_w.dtype))
        if need_h and keep is not None:
            grad_h = torch.zeros_like(hidden).index_copy_(0, keep, grad_h)
        return grad_h, grad_w, None, None, None, None, None, None


def _use_fused(hidden: torch.Tensor, fused: bool | None) -> tuple[bool, bool]:
    """(use the gradient-in-forward Function, run its rows through Triton)."""
    tri = use_triton_for(hidden, fused)
    return (tri or fused is True), tri


@torch.compiler.disable
def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, softcap=None, z_loss=0.0,
                         fused: bool | None = None, chunk_size: int | None = None):
    """Summed loss over the tokens whose label != ignore_index. hidden [N, H], labels [N] already shifted.

    fused=None: the fused Function on CUDA (Triton rows), the checkpointed reference elsewhere;
    fused=True on CPU runs the fused Function with plain-PyTorch rows; False: the reference.
    """
    host = host_copy(labels)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    fn, tri = _use_fused(hidden, fused)
    if fn and (torch.is_grad_enabled() or tri):
        return LinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, softcap, float(z_loss),
                                                chunk_size, tri, None if host is None else host.reshape(-1))
    return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, softcap, z_loss, chunk_size or 4096)


@torch.compiler.disable
def token_logprobs(hidden, weight, labels, ignore_index=-100, softcap=None, fused: bool | None = None,
                   chunk_size: int | None = None):
    """Per-token log p(label) [N] (0 where ignored); same `fused` rule as linear_cross_entropy."""
    host = host_copy(labels)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    fn, tri = _use_fused(hidden, fused)
    if fn:
        return TokenLogprobsFunction.apply(hidden, weight, labels, ignore_index, softcap, chunk_size, tri,
                                           None if host is None else host.reshape(-1))
    return token_logprobs_reference(hidden, weight, labels, ignore_index, softcap, chunk_size or 4096)
