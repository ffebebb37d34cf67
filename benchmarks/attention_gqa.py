"""cuDNN attention at the Llama-3.1-8B shape (2 x 2048, 32 query / 8 key-value heads, d 128): GQA as the
decoder calls it next to key/value heads repeated to 32 (MHA), and torch's FlashAttention-2 varlen.

    python benchmarks/attention_gqa.py     # H200

Forward and forward + backward, 20 timed calls after a warm-up (CUDA events). Session 7: GQA on the
decoder's [B, T, H, D] views 0.143 ms forward, 0.488 ms backward; repeated to MHA 0.146 / 0.458 ms plus
0.073 ms to repeat and 0.046 ms to sum the key/value gradients back; contiguous [B, H, T, D] GQA is
slower in backward (0.624 ms); FlashAttention-2 varlen 0.281 / 1.099 ms forward / both. The decoder's
call is already the fastest.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dequant import timed as dequant_timed  # noqa: E402

from tunery.kernels.attention import flash_varlen  # noqa: E402

B, T, H, HKV, D = 2, 2048, 32, 8, 128


def timed(fn, n: int = 20) -> float:
    """ms per call (dequant.py's CUDA-event timer)."""
    return dequant_timed(fn, n, True) * 1e3


def fwd_bwd(f, inputs) -> dict:
    inputs = [t.detach().requires_grad_() for t in inputs]
    grad = torch.randn_like(f(*inputs))
    t_f = timed(lambda: f(*inputs))
    t_fb = timed(lambda: torch.autograd.grad(f(*inputs), inputs, grad))
    return {"fwd_ms": round(t_f, 4), "bwd_ms": round(t_fb - t_f, 4)}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("attention_gqa.py needs CUDA")
    torch.manual_seed(0)
    q = torch.randn(B * T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B * T, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B * T, HKV, D, device="cuda", dtype=torch.bfloat16)
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention

    def dense(qq, kk, vv):
        return cudnn(qq, kk, vv, None, True, 0.0, True, False, scale=D ** -0.5)[0]

    def views(*ts):  # [N, h, D] -> [B, h, T, D] views of [B, T, h, D] memory, as the decoder passes them
        return [t.view(B, T, t.shape[1], D).transpose(1, 2) for t in ts]

    rep = H // HKV
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    res = {
        "gqa_views (the decoder's call)": fwd_bwd(dense, views(q, k, v)),
        "gqa_contiguous": fwd_bwd(dense, [t.contiguous() for t in views(q, k, v)]),
        "mha_repeated_views": fwd_bwd(dense, views(q, kr, vr)),
        "repeat_kv_ms": round(timed(lambda: (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))), 4),
        "sum_kv_grads_ms": round(timed(lambda: (kr.view(B * T, HKV, rep, D).sum(2),
                                                vr.view(B * T, HKV, rep, D).sum(2))), 4),
    }
    cu = torch.tensor([0, T, 2 * T], device="cuda", dtype=torch.int32)
    res["flash2_varlen"] = fwd_bwd(lambda a, b, c: flash_varlen(a, b, c, cu, T, D ** -0.5), [q, k, v])
    for key, val in res.items():
        print(f"{key:32s} {val}")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "attention_gqa.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
