"""Held-out GSM8K accuracy of greedy answers before and after ~100 GRPO steps of examples/grpo_gsm8k.yaml.

    python benchmarks/grpo_gsm8k.py                      # one GPU: 100 steps, 16 prompts x 8 completions each
    python benchmarks/grpo_gsm8k.py --steps 2 --eval-rows 4 --generations 2 --max-completion 16 \
        --prompts-per-step 2                             # a CPU smoke run

Training prompts are GSM8K train rows (../shared/data/gsm8k/train.jsonl when it is there, else the bundled
examples/data/gsm8k_sample.jsonl); the held-out set is the last --eval-rows rows of that file, never trained on.
Accuracy is measured on greedy answers (max_completion_length tokens) at step 0 and after the last step:
strict = the gsm8k_answer reward (the number after '####' or in \\boxed{} equals the reference), lenient = the
last number of the answer equals the reference. Prints one JSON object, also written to $OUT/grpo_gsm8k.json
when OUT is set; the run directory (metrics.jsonl) is kept under $OUT too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def last_number(prompts, completions, answer, **_):
    """Lenient accuracy (logged with weight 0, so it never shapes training): the last number equals the reference."""
    from tunery.methods.rewards import final_answer, normalize_number

    out = []
    for c, a in zip(completions, answer):
        nums = re.findall(r"-?\$?\d[\d,]*(?:\.\d+)?", c)
        got = normalize_number(nums[-1]) if nums else None
        out.append(1.0 if got is not None and got == final_answer(str(a)) else 0.0)
    return out


def _source() -> Path:
    for p in (os.environ.get("TUNERY_GSM8K"), REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl",
              REPO / "shared" / "data" / "gsm8k" / "train.jsonl", REPO / "examples" / "data" / "gsm8k_sample.jsonl"):
        if p and Path(p).is_file():
            return Path(p)
    sys.exit("no GSM8K data found: set TUNERY_GSM8K to a jsonl file with question/answer rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-rows", type=int, default=500)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=8, help="prompts per micro-batch")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-completion", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the example's)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from tunery.config import apply_overrides, load_config, read_yaml
    from tunery.train.grpo_loop import GRPOTrainer

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    work = Path(tempfile.mkdtemp(prefix="grpo_gsm8k_"))
    source = _source()
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    n_eval = min(args.eval_rows, len(rows) // 5)  # the bundled 500-row sample keeps 400 rows to train on
    held = rows[-n_eval:]
    train_rows = rows[:-n_eval][: max(args.steps * args.prompts_per_step, 64)]
    for name, part in (("train.jsonl", train_rows), ("heldout.jsonl", held)):
        with open(work / name, "w") as f:
            for r in part:
                f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")

    example = REPO / "examples" / "grpo_gsm8k.yaml"
    data = read_yaml(example)
    mb = min(args.micro_batch, args.prompts_per_step)
    data.update({
        "datasets": [{**data["datasets"][0], "path": str(work / "train.jsonl")}],
        "test_datasets": [{**data["datasets"][0], "path": str(work / "heldout.jsonl")}],
        "dataset_prepared_path": str(work / "prepared"),
        "max_steps": args.steps, "micro_batch_size": mb,
        "gradient_accumulation_steps": max(1, args.prompts_per_step // mb),
        "output_dir": str((out_dir or work) / "grpo_gsm8k_run"), "save_steps": None, "progress_bar": False,
    })
    g = data["grpo"]
    g.update({"num_generations": args.generations, "max_completion_length": args.max_completion,
              "reward_funcs": list(g["reward_funcs"]) + [f"{Path(__file__).resolve()}:last_number"],
              "reward_weights": list(g.get("reward_weights") or [1.0] * len(g["reward_funcs"])) + [0.0]})
    if args.lr is not None:
        data["learning_rate"] = args.lr
    data = apply_overrides(data, args.overrides)
    cfg = load_config(data)

    t0 = time.perf_counter()
    trainer = GRPOTrainer(cfg, cfg_dir=example.parent, eval_before=True)
    run = trainer.run()
    wall = time.perf_counter() - t0

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_reward" in m]
    steps = [m for m in metrics if "loss" in m]
    first, last = evals[0], evals[-1]
    eval_s = sum(m.get("eval_time_s", 0.0) for m in evals)

    def mean(key, rows):
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None

    k = max(1, len(steps) // 10)
    result = {
        "benchmark": "grpo_gsm8k",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "steps": len(steps), "prompts_per_step": args.prompts_per_step, "num_generations": args.generations,
        "max_completion_length": args.max_completion, "learning_rate": cfg.learning_rate,
        "data": str(source), "train_rows": len(train_rows), "heldout_rows": first.get("eval_rows"),
        "heldout_accuracy_step0": first.get("eval_reward_gsm8k_answer"),
        "heldout_accuracy_final": last.get("eval_reward_gsm8k_answer"),
        "heldout_lenient_step0": first.get("eval_reward_last_number"),
        "heldout_lenient_final": last.get("eval_reward_last_number"),
        "heldout_format_step0": first.get("eval_reward_format"),
        "heldout_format_final": last.get("eval_reward_format"),
        "train_reward_first10pct": mean("reward", steps[:k]), "train_reward_last10pct": mean("reward", steps[-k:]),
        "completion_len_first10pct": mean("completion_len_mean", steps[:k]),
        "completion_len_last10pct": mean("completion_len_mean", steps[-k:]),
        "gen_tokens_per_s_mean": mean("gen_tokens_per_s", steps),
        "generation_fraction_mean": mean("generation_fraction", steps),
        "wall_s": round(wall, 1), "eval_s": round(eval_s, 1), "train_s": round(wall - eval_s, 1),
        "improved": (last.get("eval_reward_gsm8k_answer") or 0) > (first.get("eval_reward_gsm8k_answer") or 0),
        "run_dir": str(run),
        "command": "python benchmarks/grpo_gsm8k.py " + " ".join(sys.argv[1:]),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "grpo_gsm8k.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
