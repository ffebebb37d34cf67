"""examples/grpo_gsm8k.yaml runs as shipped (embedded model, LoRA, GSM8K prompts), shrunk to 2 tiny steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "grpo_gsm8k.yaml"


@pytest.mark.slow
def test_grpo_gsm8k_example_runs(tmp_path, smol_path, gsm8k_small):
    from tunery.train import train

    overrides = [f"output_dir={tmp_path / 'run'}", f"dataset_prepared_path={tmp_path / 'prepared'}",
                 "max_steps=2", "micro_batch_size=2", "gradient_accumulation_steps=1", "save_steps=null",
                 "progress_bar=false", "grpo.num_generations=2", "grpo.max_completion_length=16"]
    if not (EXAMPLE.parent / "data" / "gsm8k_sample.jsonl").is_file():
        overrides.append(f"datasets.0.path={gsm8k_small}")
    run = train(EXAMPLE, overrides)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["completion_len_max"] <= 16
        assert {"reward_gsm8k_answer", "reward_format", "gen_tokens_per_s", "generation_fraction"} <= set(r)
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
