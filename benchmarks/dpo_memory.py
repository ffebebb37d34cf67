"""Peak GPU memory of a preference step against an SFT step over the same tokens (issue: DPO <= 1.3x SFT).

    python benchmarks/dpo_memory.py            # CUDA: Llama-3.2-1B shape, bf16, LoRA r=16 and full fine-tuning
    python benchmarks/dpo_memory.py --smoke    # CPU: tiny shapes, checks that every path runs (no memory numbers)

Random weights (nothing downloaded). Every step sees the same flat row of N tokens: SFT trains on 2P sequences;
DPO/KTO/ORPO/SimPO/RM see them as P pairs (chosen and rejected through one forward pass). The DPO reference is the
adapter switched off (LoRA) or precomputed log-probs carried by the batch (full fine-tuning; a frozen copy would
double the weights, which is what precompute_ref_log_probs avoids). Each method runs in a fresh process; reported:
peak torch.cuda.max_memory_allocated over a forward+backward after one warm-up step, the same minus the memory
held before the step (weights, grads, optimizer-free), and ratios to SFT. Results go to $OUT/dpo_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=500000.0)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)
METHODS = ["sft", "dpo", "kto", "orpo", "simpo", "rm"]


def make_rows(pairs: int, prompt: int, answer: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    rows = []
    for _ in range(pairs):
        p, c, r = ids(prompt), ids(answer), ids(answer)
        rows.append({"chosen_input_ids": p + c, "chosen_labels": [-100] * prompt + c,
                     "rejected_input_ids": p + r, "rejected_labels": [-100] * prompt + r})
    return rows


def batch_for(method: str, rows, device):
    from tunery.data.collate import collate_kto, collate_preference, collate_sft

    if method == "sft":
        seqs = [{"input_ids": r[f"{s}_input_ids"], "labels": r[f"{s}_labels"]} for s in ("chosen", "rejected")
                for r in rows]
        b = collate_sft(seqs)
    elif method == "kto":
        # KTO's flat row also holds the mismatched KL pairs (no grad): same trained tokens as the others
        kto_rows = []
        for r in rows:
            for side, label in (("chosen", True), ("rejected", False)):
                n = r[f"{side}_labels"].count(-100)
                kto_rows.append({"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"],
                                 "prompt_len": n, "kto_label": label})
        b = collate_kto(kto_rows)
    else:
        b = collate_preference(rows)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}


def worker(args) -> dict:
    import torch
    from transformers import LlamaConfig

    from tunery.adapters import inject_lora
    from tunery.methods import build_method
    from tunery.methods.dpo import DPO
    from tunery.models import build_own

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY if args.smoke else LLAMA_1B
    torch.manual_seed(0)
    model = build_own(LlamaConfig(**shape), dtype, device)
    if args.mode == "lora":
        inject_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16, 32)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if cuda:
        from tunery.models.fused import set_fused

        set_fused(model, True)
    model.train()
    from types import SimpleNamespace

    cfg = SimpleNamespace(rl=None if args.method == "sft" else args.method, rl_beta=0.1, dpo_loss_type="sigmoid",
                          dpo_label_smoothing=0.0, rpo_alpha=None, precompute_ref_log_probs=False,
                          kto_desirable_weight=1.0, kto_undesirable_weight=1.0, orpo_alpha=0.1, simpo_gamma=0.5,
                          rm_center_rewards_coefficient=None, micro_batch_size=2 * args.pairs, seed=0)
    method = build_method(cfg)
    rows = make_rows(args.pairs, args.prompt, args.answer, shape["vocab_size"])
    batch = batch_for(args.method, rows, device)
    precomputed = isinstance(method, DPO) and args.mode == "full"
    if hasattr(method, "setup") and not precomputed:
        method.setup(model, cfg, None)
    if precomputed:
        # precomputed reference (what precompute_ref_log_probs gives): the batch carries the values
        with torch.no_grad():
            from tunery.methods.sequences import forward_hidden, sequence_logps

            s = sequence_logps(model, forward_hidden(model, batch), batch, 2 * args.pairs).sums
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = s[: args.pairs], s[args.pairs:]
    n = method.count(batch)
    times = []
    peak = before = 0
    for _ in range(2):
        model.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t = time.perf_counter()
        loss, _ = method.loss(model, batch, n)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        times.append(time.perf_counter() - t)
    return {"method": args.method, "mode": args.mode, "tokens": int(batch["input_ids"].numel()),
            "peak_gib": peak / 2**30, "step_gib": (peak - before) / 2**30, "step_s": times[-1],
            "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--answer", type=int, default=768)
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "MODE"))
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.smoke:
        args.prompt, args.answer = min(args.prompt, 16), min(args.answer, 24)
    if args.worker:
        args.method, args.mode = args.worker
        Path(args.result).write_text(json.dumps(worker(args)))
        return
    results = []
    for mode in args.modes.split(","):
        for method in args.methods.split(","):
            if mode == "full" and method not in ("sft", "dpo"):
                continue
            out = Path(os.environ.get("TMPDIR", "/tmp")) / f"dpo_memory_{method}_{mode}.json"
            cmd = [sys.executable, __file__, "--worker", method, mode, "--result", str(out), "--pairs",
                   str(args.pairs), "--prompt", str(args.prompt), "--answer", str(args.answer)]
            if args.smoke:
                cmd.append("--smoke")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                results.append({"method": method, "mode": mode, "error": proc.stderr[-2000:]})
                print(f"{mode:5s} {method:6s} FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(out.read_text()))
    for mode in args.modes.split(","):
        sft = next((r for r in results if r.get("mode") == mode and r.get("method") == "sft" and "error" not in r), None)
        for r in results:
            if r.get("mode") == mode and sft and "error" not in r and sft["peak_gib"] > 0:
                r["peak_vs_sft"] = r["peak_gib"] / sft["peak_gib"]
                r["step_vs_sft"] = r["step_gib"] / max(sft["step_gib"], 1e-9)
    for r in results:
        if "error" in r:
            continue
        print(f"{r['mode']:5s} {r['method']:6s} tokens {r['tokens']:6d}  peak {r['peak_gib']:7.2f} GiB "
              f"(x{r.get('peak_vs_sft', float('nan')):.2f} SFT)  step {r['step_gib']:6.2f} GiB "
              f"(x{r.get('step_vs_sft', float('nan')):.2f})  {r['step_s'] * 1000:7.1f} ms  loss {r['loss']:.4f}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "dpo_memory.json").write_text(json.dumps(results, indent=1))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
