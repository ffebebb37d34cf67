"""`tunery plan` against real `tunery train` runs (issue 5): predicted vs measured peak GPU memory.

    python benchmarks/plan_check.py                    # GPU: every case below, a few steps each
    python benchmarks/plan_check.py --cases lora-ckpt  # some of them
    python benchmarks/plan_check.py --smoke            # CPU: tiny shape, 1 step (checks the plumbing)

Each case is a YAML config run by the real CLI (`tunery train`, its own subprocess) on random weights
of a public model shape, saved as an HF folder with the embedded model's tokenizer, trained on the
bundled GSM8K sample with sample packing (rows filled to sequence_len). The measured peak is the
largest `gpu_peak_gib` in the run's metrics.jsonl (torch.cuda.max_memory_allocated, what the planner
predicts); the prediction is `tunery.train.plan.plan(config)`, the function behind `tunery plan`.
The cases are chosen to differ from the configurations the planner was calibrated on
(benchmarks/memory.py: Llama-3.1-8B shape, offload). Results: $OUT/plan_check.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
GiB = 1 << 30

SHAPES = {  # public shapes (vocab taken from the tokenizer)
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "gemma-2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
CASES = {  # name: (shape, config keys)
    "lora-ckpt": ("llama-3.2-1b", dict(adapter="lora", lora_r=16, sequence_len=4096, micro_batch_size=2,
                                       gradient_checkpointing=True)),
    "lora-nockpt": ("llama-3.2-1b", dict(adapter="lora", lora_r=8, sequence_len=2048, micro_batch_size=2)),
    "qlora-offload": ("llama-3.2-1b", dict(adapter="qlora", load_in_4bit=True, lora_r=32, sequence_len=8192,
                                           micro_batch_size=1, gradient_checkpointing="offload")),
    "qlora-ckpt": ("llama-3.2-1b", dict(adapter="qlora", load_in_4bit=True, lora_r=16, sequence_len=4096,
                                        micro_batch_size=4, gradient_checkpointing=True)),
    "full-ckpt": ("llama-3.2-1b", dict(sequence_len=2048, micro_batch_size=2, gradient_checkpointing=True)),
    "qwen-lora": ("qwen2.5-0.5b", dict(adapter="lora", lora_r=16, sequence_len=4096, micro_batch_size=2,
                                       gradient_checkpointing=True)),
    # tenth session: DoRA on a 4-bit base, streamed 4-bit weights, Gemma-2 (softcaps, sliding window,
    # head_dim 256), 16-bit LoRA with every activation offloaded
    "qlora-dora": ("llama-3.2-1b", dict(adapter="qlora", load_in_4bit=True, lora_r=16, peft_use_dora=True,
                                        sequence_len=4096, micro_batch_size=2, gradient_checkpointing=True)),
    "qlora-stream": ("llama-3.2-1b", dict(adapter="qlora", load_in_4bit=True, lora_r=16, sequence_len=4096,
                                          micro_batch_size=2, gradient_checkpointing="offload",
                                          offload_strategy="activations", offload_keep_on_gpu=4,
                                          offload_weights=8)),
    "gemma2-lora": ("gemma-2-2b", dict(adapter="lora", lora_r=16, sequence_len=2048, micro_batch_size=2,
                                       gradient_checkpointing=True)),
    "qwen-offload-acts": ("qwen2.5-0.5b", dict(adapter="lora", lora_r=8, sequence_len=8192, micro_batch_size=1,
                                               gradient_checkpointing="offload", offload_strategy="activations",
                                               offload_keep_on_gpu=2)),
}


def build_model(shape: str, tok_dir: Path, out: Path) -> Path:
    """Random bf16 weights of `shape` with the tokenizer of `tok_dir`, saved as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    kw = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(kw.pop("model_type"), vocab_size=len(tok), max_position_embeddings=16384,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def run_case(name: str, model_dir: Path, keys: dict, work: Path, steps: int, timeout: int) -> dict:
    import yaml

    from tunery.train.plan import plan

    run_dir = work / name
    lora = {"lora_alpha": 32, "lora_dropout": 0.0, "lora_target_linear": True} if keys.get("adapter") else {}
    cfg = {"base_model": str(model_dir), **lora,
           "datasets": [{"path": str(ROOT / "examples" / "data" / "gsm8k_sample.jsonl"), "type": "alpaca",
                         "field_instruction": "question", "field_output": "answer"}],
           "sample_packing": True, "max_steps": steps, "learning_rate": 1e-4, "seed": 0,
           "output_dir": str(run_dir), **keys}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = plan(str(path), 141 * GiB)
    res = {"case": name, "config": keys, "predicted_gib": round(report.peak / GiB, 3)}
    cmd = [sys.executable, "-m", "tunery.cli", "train", str(path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        res["rc"] = proc.returncode
        if proc.returncode:
            res["stderr_tail"] = proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        res["rc"] = "timeout"
    metrics = run_dir / "metrics.jsonl"
    peaks = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "gpu_peak_gib" in row:
                peaks.append(row["gpu_peak_gib"])
    if peaks:
        res["measured_gib"] = max(peaks)
        res["error"] = res["predicted_gib"] / res["measured_gib"] - 1
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokenizer", default=None, help="folder with tokenizer files (default: the embedded model)")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.tokenizer:
        tok_dir = Path(args.tokenizer)
    else:
        from tunery.models import resolve_model_path

        tok_dir = resolve_model_path("default")
    cases = {"smoke": ("tiny", dict(adapter="lora", lora_r=4, sequence_len=256, micro_batch_size=1))} if args.smoke \
        else {k: CASES[k] for k in args.cases.split(",")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models: dict[str, Path] = {}
        for name, (shape, keys) in cases.items():
            if shape not in models:
                models[shape] = build_model(shape, tok_dir, work / f"model-{shape}")
            r = run_case(name, models[shape], keys, work, 1 if args.smoke else args.steps, args.timeout)
            rows.append(r)
            meas = f"{r['measured_gib']:.2f} GiB" if "measured_gib" in r else f"no GPU peak (rc {r.get('rc')})"
            err = f"{r['error']:+.1%}" if "error" in r else ""
            print(f"{name:<14} {shape:<13} planner {r['predicted_gib']:6.2f} GiB  measured {meas:>12}  {err}",
                  flush=True)
            if r.get("stderr_tail") and r.get("rc"):
                print(r["stderr_tail"][-800:], flush=True)
    errs = [abs(r["error"]) for r in rows if "error" in r]
    if errs:
        print(f"largest planner error: {max(errs):.1%} over {len(errs)} runs (target: within 15%)")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "plan_check.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
