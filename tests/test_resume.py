"""Exact resume: a run killed with SIGKILL and resumed logs the same losses and ends with the same
weights, bit for bit, as a run that was never interrupted (fp32, CPU, deterministic)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file


def write_config(path: Path, model: Path, data: Path, out: Path) -> Path:
    cfg = {
        "base_model": str(model), "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
        "lora_target_linear": True,
        "datasets": [{"path": str(data), "type": "alpaca", "field_instruction": "question", "field_output": "answer"}],
        "sequence_len": 256, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 10,
        "learning_rate": 1e-3, "warmup_steps": 2, "save_steps": 2, "seed": 7, "deterministic": True,
        "val_set_size": 4, "eval_steps": 5, "output_dir": str(out), "progress_bar": False,
        "dataset_prepared_path": str(path.parent / "prepared"),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tunery", "train", str(cfg), *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_is_bit_exact(tiny_llama, gsm8k_small, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    a = tmp_path / "a"
    subprocess.run(train_cmd(write_config(tmp_path / "a.yaml", tiny_llama, gsm8k_small, a)), check=True, env=env,
                   capture_output=True, timeout=600)

    b = tmp_path / "b"
    cfg_b = write_config(tmp_path / "b.yaml", tiny_llama, gsm8k_small, b)
    proc = subprocess.Popen(train_cmd(cfg_b), env={**env, "TUNERY_DEBUG_STEP_DELAY": "0.4"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (b / "metrics.jsonl").exists() and any(r.get("step", 0) >= 5 and "loss" in r for r in rows(b)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in rows(b))
    assert 5 <= killed_at < 10, "the kill must land partway through"
    assert not (b / "adapter").exists()

    subprocess.run(train_cmd(cfg_b, "resume_from_checkpoint=auto"), check=True, env=env, capture_output=True,
                   timeout=600)
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "grad_norm", "eval_loss"):
            assert x.get(key) == y.get(key), (x["step"], key)
    wa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].equal(wb[k]), k
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["config_hash"] and str(gsm8k_small) in manifest["data"]["files"]
