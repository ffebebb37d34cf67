"""NF4 dequantization speed (issue 5): Tunery's Triton kernel next to bitsandbytes' CUDA kernel.

    python benchmarks/dequant.py            # H200: the seven linears of a Llama-3.1-8B block
    python benchmarks/dequant.py --smoke    # CPU: tiny shapes through the plain-PyTorch reference
    python benchmarks/dequant.py --sweep    # H200: launch shapes of the gate+up kernel (CPU: TRITON_INTERPRET=1)

Both dequantize the same random [out, in] weights (NF4, block 64, double quantization) to bf16; each
kernel runs `--repeats` times per shape after a warm-up and is timed with CUDA events. Reported: us
per call, effective bandwidth (0.5 byte read + 2 bytes written per weight, plus scales), the time
of one dequantization of all 32 blocks (what one forward, recompute or backward pass of QLoRA costs
in dequantization), and that Tunery's output equals the plain-PyTorch reference bit for bit.
Results: $OUT/dequant.json when OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
             "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
LAYERS_8B = 32


def timed(fn, repeats: int, cuda: bool) -> float:
    """Seconds per call."""
    import time

    fn()
    if not cuda:
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def bnb_dequant(w: torch.Tensor):
    """bitsandbytes' own quantize/dequantize of w (None when bitsandbytes is not importable)."""
    try:
        import bitsandbytes.functional as bf
    except Exception:
        return None
    q, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return lambda: bf.dequantize_4bit(q, state, quant_type="nf4")


def sweep(args) -> None:
    """Launch shapes of the multi-weight kernel on the 8B gate/up pair (the largest dequantization of
    a step, 4 times per block per step), written as kernels/lora.py's K-concat path writes them."""
    from tunery.quant.nf4 import NF4Weight
    from tunery.quant.triton_nf4 import _SCALES, dequantize_nf4_many_triton

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    inter, hidden = (14336, 4096) if cuda else (256, 128)
    gen = torch.Generator(device=device).manual_seed(0)
    ws = [NF4Weight.from_tensor(torch.randn(inter, hidden, device=device, generator=gen, dtype=torch.bfloat16) * 0.02,
                                double_quant=True, dtype=torch.bfloat16) for _ in range(2)]
    parts = [(w.packed, w.absmax, w.absmax2, w.absmax_offset) for w in ws]
    k = hidden + 32  # [W | B] with B of two rank-16 adapters

    def run(out, scales, warps):
        rows = out.split([inter, inter])
        dequantize_nf4_many_triton(parts, [r[0] for r in rows], hidden, out.stride(0), scales, warps)

    ref = torch.zeros(2 * inter, k, dtype=torch.bfloat16, device=device)
    run(ref, _SCALES, 4)
    nbytes = 2 * inter * hidden * 2.5 + sum(w.absmax.numel() for w in ws)
    results = []
    for scales in (32, 64, 128, 256):
        for warps in (2, 4, 8):
            out = torch.zeros_like(ref)
            run(out, scales, warps)
            exact = bool(torch.equal(out, ref))
            t = timed(functools.partial(run, out, scales, warps), args.repeats if cuda else 1, cuda)
            results.append({"scales": scales, "num_warps": warps, "us": t * 1e6, "gbps": nbytes / t / 1e9,
                            "equals_default": exact})
            print(f"scales {scales:4d} warps {warps}: {t * 1e6:8.1f} us {nbytes / t / 1e9:7.0f} GB/s  exact={exact}",
                  flush=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "dequant_sweep.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="instead: time gate+up dequantized in one launch into the fused LoRA layout ([W | B]) for "
                         "each launch shape (blocks per program x warps), each checked against the default's output")
    args = ap.parse_args()
    if args.sweep:
        sweep(args)
        return
    from tunery.quant.nf4 import NF4Weight, dequantize_nf4_reference

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    shapes = {k: (o // 64, i // 64) for k, (o, i) in SHAPES_8B.items()} if args.smoke else SHAPES_8B
    gen = torch.Generator(device=device).manual_seed(0)
    rows, total = [], {"tunery": 0.0, "bitsandbytes": 0.0}
    for name, shape in shapes.items():
        w = torch.randn(shape, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
        q = NF4Weight.from_tensor(w, double_quant=True, dtype=torch.bfloat16)
        ref = dequantize_nf4_reference(q.packed, q.absmax, q.numel(), torch.bfloat16, q.absmax2, q.absmax_offset)
        exact = bool(torch.equal(q.dequantize().reshape(-1), ref))
        t_ours = timed(q.dequantize, args.repeats, cuda)
        bnb = bnb_dequant(w) if cuda else None
        t_bnb = timed(bnb, args.repeats, cuda) if bnb else None
        nbytes = w.numel() * 2.5 + q.absmax.numel()
        row = {"linear": name, "shape": list(shape), "tunery_us": t_ours * 1e6, "tunery_gbps": nbytes / t_ours / 1e9,
               "bitsandbytes_us": t_bnb * 1e6 if t_bnb else None, "equals_reference": exact,
               "speedup_over_bnb": t_bnb / t_ours if t_bnb else None}
        rows.append(row)
        total["tunery"] += t_ours
        total["bitsandbytes"] += t_bnb or 0.0
        bnb_txt = f"  bitsandbytes {t_bnb * 1e6:8.1f} us  ({t_bnb / t_ours:.2f}x)" if t_bnb else ""
        print(f"{name:<10} {str(tuple(shape)):<14} tunery {t_ours * 1e6:8.1f} us {row['tunery_gbps']:7.0f} GB/s"
              f"  exact={exact}{bnb_txt}", flush=True)
    layers = LAYERS_8B if not args.smoke else 1
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows,
              "model_pass_ms": {k: v * layers * 1e3 for k, v in total.items() if v}}
    for k, v in report["model_pass_ms"].items():
        print(f"one dequantization of all {layers} blocks, {k}: {v:.2f} ms")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "dequant.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
