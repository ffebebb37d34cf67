"""Two ceilings behind the QLoRA step (issue 5): host<->GPU copy bandwidth, and attention kernels.

    python benchmarks/attention_pcie.py          # GPU only; prints JSON, writes $OUT/attention_pcie.json

- PCIe: 1 GiB between pinned host memory and the GPU, one way at a time and both at once (what the
  activation offload can move per step while compute runs).
- Attention, 2 rows x 2048 tokens, 32 query / 8 key-value heads, head dim 128, causal, forward and
  forward + backward: Tunery's flash varlen path (packed rows), Tunery's dense path (one document
  per row: SDPA with cuDNN first), and SDPA restricted to each backend (flash, cuDNN, efficient).
  Each result is compared with the flash varlen output (max abs difference).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dequant import timed  # noqa: E402


def bench(fn, n: int = 10) -> float:
    """Mean ms per call over n calls after one warm-up (CUDA events: dequant.timed)."""
    return 1e3 * timed(fn, n, cuda=True)


def pcie(res: dict, nbytes: int = 1 << 30) -> None:
    host_a = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host_b = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev_a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev_b = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out_s, in_s = torch.cuda.Stream(), torch.cuda.Stream()

    def copy(d2h: bool, h2d: bool):
        cur = torch.cuda.current_stream()
        for s, on in ((out_s, d2h), (in_s, h2d)):
            if on:
                s.wait_stream(cur)
        if d2h:
            with torch.cuda.stream(out_s):
                host_a.copy_(dev_a, non_blocking=True)
        if h2d:
            with torch.cuda.stream(in_s):
                dev_b.copy_(host_b, non_blocking=True)
        for s, on in ((out_s, d2h), (in_s, h2d)):
            if on:
                cur.wait_stream(s)

    for name, d2h, h2d in (("d2h", True, False), ("h2d", False, True), ("both", True, True)):
        ms = bench(lambda d2h=d2h, h2d=h2d: copy(d2h, h2d), 5)
        res[f"pcie_{name}_GBps"] = round((d2h + h2d) * nbytes / ms / 1e6, 1)


def attention(res: dict) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tunery.kernels.attention import flash_varlen, varlen_attention

    torch.manual_seed(0)
    rows, t, h, kv, d = 2, 2048, 32, 8, 128
    n = rows * t
    q, k, v = (torch.randn(n, x, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for x in (h, kv, kv))
    go = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(0, n + 1, t, device="cuda", dtype=torch.int32)
    scale = d ** -0.5
    ref = flash_varlen(q, k, v, cu, t, scale).detach()
    runs = {"tunery_flash_varlen": lambda: flash_varlen(q, k, v, cu, t, scale),
            "tunery_auto_dense": lambda: varlen_attention(q, k, v, cu, t, scale)}
    q4, k4, v4 = (x.detach().view(rows, t, x.shape[1], d).transpose(1, 2).requires_grad_() for x in (q, k, v))
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def sdpa(be=be):
            with sdpa_kernel([be]):
                o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
            return o.transpose(1, 2).reshape(n, h, d)
        runs[f"sdpa_{be.name.lower()}"] = sdpa
    for name, fn in runs.items():
        try:
            out = fn()
            res[name] = {"fwd_ms": round(bench(fn), 3), "fwd_bwd_ms": round(bench(lambda fn=fn: fn().backward(go)), 3),
                         "max_abs_diff_vs_flash": float((out.detach() - ref).abs().max())}
        except RuntimeError as e:  # a backend that cannot run these shapes
            res[name] = f"unavailable: {str(e)[:120]}"


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    pcie(res)
    attention(res)
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "attention_pcie.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
