"""DoRA's peak GPU memory against the planner, and what is live at each peak (tenth session).

    python benchmarks/dora_peak.py dora 4096 2      # QLoRA + DoRA, seq 4096 x micro-batch 2
    python benchmarks/dora_peak.py dora16 4096 2    # 16-bit LoRA + DoRA
    python benchmarks/dora_peak.py lora 4096 2      # QLoRA without DoRA (the fused path), for comparison

Random weights of the Llama-3.2-1B shape (plan_check.py's model folder, the tokenizer's vocab), r=16 on all seven linears, fp32 adapters, bf16
autocast, gradient checkpointing on, the fused loss; two warm-up steps, then the peak of one step
(torch.cuda.max_memory_allocated) beside `tunery.train.plan`'s prediction, and the live allocations at
the forward, loss and backward peaks by source line (peak_breakdown.py's replay). This is how DoRA's
fp32 outputs were found: every DoRA layer returned fp32 under autocast (the norm is fp32 there), so the
residual stream and everything saved after it doubled. Needs TUNERY_TEST_TOKENIZER or the embedded
model for the tokenizer files. CUDA only.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _site(e: dict) -> str:
    keep = [f for f in e.get("frames", []) if "tunery" in f["filename"] or "torch/nn" in f["filename"]]
    return " <- ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in keep[:3]) or "?"


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] not in ("dora", "dora16", "lora"):
        raise SystemExit(__doc__)
    if not torch.cuda.is_available():
        raise SystemExit("dora_peak.py needs CUDA")
    import peak_breakdown as pb
    import plan_check

    from tunery.adapters import inject_lora, reset_dora_magnitudes
    from tunery.kernels.cross_entropy import linear_cross_entropy
    from tunery.models import load_model, resolve_model_path
    from tunery.quant import quantize_model
    from tunery.train.activations import apply_checkpointing
    from tunery.train.plan import ModelShape, Setup, estimate, peak_bytes

    mode, seq, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dora, quant = mode.startswith("dora"), mode != "dora16"
    tok = Path(os.environ.get("TUNERY_TEST_TOKENIZER") or resolve_model_path("default"))
    folder = plan_check.build_model("llama-3.2-1b", tok, Path(tempfile.mkdtemp()) / "model")
    hf = json.loads((folder / "config.json").read_text())
    model = load_model(str(folder), torch.bfloat16, "cpu").model
    inject_lora(model, TARGETS, 16, 32, 0.0, use_dora=dora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.to("cuda")
    if quant:
        quantize_model(model, compute_dtype=torch.bfloat16)
        if dora:
            reset_dora_magnitudes(model)
    apply_checkpointing(model, True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, hf["vocab_size"], (batch, seq), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model(ids)
            loss = linear_cross_entropy(h.reshape(-1, h.shape[-1])[:-1], model.head_weight, ids.reshape(-1)[1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    shape = ModelShape.from_hf(hf)
    s = Setup(seq_len=seq, micro_batch=batch, adapter="qlora" if quant else "lora", lora_r=16, checkpointing=True,
              mlp_chunk=8192, dora=dora)
    pred = peak_bytes(shape, s) / 2**30
    start, events = pb.record(step)
    print({k: round(v["bytes"] / 2**30, 3) for k, v in estimate(shape, s).items()})
    print(f"{mode} seq {seq} x {batch}: peak {peak:.3f} GiB, planner {pred:.3f} ({pred / peak - 1:+.1%}), "
          f"at step start {start / 2**30:.3f}")
    print("\n".join(pb.breakdown(events, start, top=25, site=_site)))


if __name__ == "__main__":
    main()
