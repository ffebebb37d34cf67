"""The GRPO recipe end to end on a tiny random Llama: rollouts, rewards, updates, metrics, the train() dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

REWARDS_PY = '''
def varied(prompts, completions, completion_ids, **kw):
    """Some spread inside every group, so advantages are not all zero."""
    return [float(sum(ids) % 7) / 7.0 for ids in completion_ids]

def has_answer(prompts, completions, answer, **kw):
    assert all("####" in a for a in answer)
    return [0.0 for _ in completions]

def broken(prompts, completions, **kw):
    return [float("nan")] * len(completions)
'''

STEP_KEYS = {"step", "loss", "lr", "grad_norm", "reward", "reward_std", "reward_varied", "reward_varied_std",
             "advantage_std", "clip_fraction", "completion_len_mean", "completion_len_max", "truncated_fraction",
             "gen_tokens_per_s", "time_generation_s", "time_training_s", "generation_fraction"}


def _config(tmp_path: Path, model: Path, data: Path, **over) -> Path:
    (tmp_path / "my_rewards.py").write_text(REWARDS_PY)
    cfg = {"base_model": str(model), "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
           "rl": "grpo", "datasets": [{"path": str(data), "type": "prompts", "field_prompt": "question"}],
           "dataset_prepared_path": str(tmp_path / "prepared"), "sequence_len": 256,
           "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2, "learning_rate": 1e-3,
           "output_dir": str(tmp_path / "run"), "progress_bar": False, "seed": 3,
           "grpo": {"num_generations": 2, "max_completion_length": 6, "max_prompt_length": 48,
                    "reward_funcs": ["my_rewards.py:varied", "my_rewards:has_answer"], "reward_weights": [1.0, 0.5]}}
    for k, v in over.items():
        if k == "grpo":
            cfg["grpo"].update(v)
        else:
            cfg[k] = v
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_runs_through_train_dispatch(tmp_path, tiny_llama, gsm8k_small):
    import signal

    from tunery.train import train

    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    run = train(_config(tmp_path, tiny_llama, gsm8k_small))
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers  # given back after the run
    rows = [r for r in _rows(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        assert r["completion_len_max"] <= 6
        assert 0.0 <= r["truncated_fraction"] <= 1.0
        assert r["reward_has_answer"] == 0.0
        assert r["clip_fraction"] == 0.0  # one update per rollout: the ratio is exactly 1
        assert r["advantage_std"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["grpo"]["completions_per_rollout"] == 4


def test_grpo_iterations_and_kl(tmp_path, tiny_llama, gsm8k_small):
    """num_iterations 2: the old log-probs are taken once per rollout; the first update sees ratio 1 and, with a
    fresh LoRA (the reference is the adapter switched off), KL 0; the second update moves both."""
    from tunery.config import load_config
    from tunery.train.grpo_loop import GRPOTrainer

    cfg = load_config(_config(tmp_path, tiny_llama, gsm8k_small, max_steps=2, learning_rate=5e-2,
                              grpo={"num_iterations": 2, "beta": 0.1, "loss_type": "grpo", "epsilon": 0.01}))
    trainer = GRPOTrainer(cfg, cfg_dir=tmp_path)
    run = trainer.run()
    rows = [r for r in _rows(run) if "loss" in r]
    assert [(r["rollout"], r["iteration"]) for r in rows] == [(0, 0), (0, 1)]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert rows[0]["clip_fraction"] == 0.0
    assert rows[1]["kl"] > 0
    assert rows[1]["clip_fraction"] > 0
    assert rows[0]["reward"] == rows[1]["reward"]  # the same rollout
    assert trainer.reference.mode == "adapter_off"  # no second copy of the model
    assert trainer.engine.model is trainer.model  # rollouts sample from the training model itself


def test_bad_reward_function_stops_the_run(tmp_path, tiny_llama, gsm8k_small):
    from tunery.methods.rewards import RewardError
    from tunery.train import train

    path = _config(tmp_path, tiny_llama, gsm8k_small, grpo={"reward_funcs": ["my_rewards.py:broken"],
                                                             "reward_weights": None})
    with pytest.raises(RewardError, match="'broken'.*nan"):
        train(path)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_wrong_dataset_type_is_explained(tmp_path, tiny_llama, gsm8k_small):
    from tunery.train import train

    path = _config(tmp_path, tiny_llama, gsm8k_small,
                   datasets=[{"path": str(gsm8k_small), "type": "alpaca", "field_instruction": "question",
                              "field_output": "answer"}])
    with pytest.raises(ValueError, match="type: prompts"):
        train(path)


def test_zero_advantage_groups_are_skipped_without_changing_the_loss(tmp_path, tiny_llama, gsm8k_small):
    from tunery.config import load_config
    from tunery.methods.grpo import GRPO
    from tunery.train.grpo_loop import GRPOTrainer

    cfg = load_config(_config(tmp_path, tiny_llama, gsm8k_small))
    trainer = GRPOTrainer(cfg, cfg_dir=tmp_path)
    trainer.device = torch.device("cpu")
    torch.manual_seed(0)
    prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 4
    completions = [[7, 8], [9], [10, 11, 12], [13], [1, 1], [2], [3, 3, 3], [4]]
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    mask_tokens = [len(c) for c in completions]
    trainer.g = cfg.grpo.model_copy(update={"num_generations": 4})
    trainer.method = GRPO(num_generations=4, loss_type="dr_grpo", max_completion_length=6)
    batches, totals = trainer._micro_batches(prompts, completions, adv, mask_tokens)
    assert totals.sequences == 8 and totals.tokens == sum(mask_tokens)
    assert sum(b["num_seqs"] for b in batches) == 4  # the all-zero group is not forwarded

    from tunery.models import load_model

    model = load_model(str(tiny_llama)).model
    skipped = sum(trainer.method.loss(model, b, totals)[0] for b in batches)
    trainer.g = cfg.grpo.model_copy(update={"num_generations": 4, "loss_type": "bnpo"})  # bnpo keeps every sequence
    full_batches, _ = trainer._micro_batches(prompts, completions, adv, mask_tokens)
    assert sum(b["num_seqs"] for b in full_batches) == 8
    full = sum(trainer.method.loss(model, b, totals)[0] for b in full_batches)
    assert skipped.item() == pytest.approx(full.item(), rel=1e-6)
