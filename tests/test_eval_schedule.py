"""When a run evaluates, checkpoints and ends early: evals_per_epoch / saves_per_epoch, early_stopping_patience,
loss_watchdog_threshold."""

from __future__ import annotations

import json

import pytest

from tunery.train.loop import Patience, every


def test_every_turns_per_epoch_counts_into_step_intervals():
    assert every(7, None, 22) == 7
    assert every(None, 4, 22) == 5  # 22 steps per epoch, 4 evals: every 5 steps
    assert every(None, 30, 22) == 1  # more evals than steps: every step
    assert every(None, None, 22) is None


def test_patience_counts_evals_without_a_lower_loss():
    p = Patience(2)
    assert not p.update(3.0) and p.best == 3.0
    assert not p.update(3.0)  # equal is no improvement
    assert not p.update(2.5) and p.stale == 0  # a new best resets the count
    assert not p.update(2.6)
    assert p.update(2.9) and p.stale == 2
    assert not Patience(None).update(1.0)
    resumed = Patience(2, **p.state())
    assert (resumed.best, resumed.stale) == (2.5, 2)


def test_early_stopping_ends_the_run_as_completed(tiny_llama, gsm8k_small, tmp_path):
    """One epoch of S steps (the manifest's total): evals every S // 4 steps (evals_per_epoch 4), checkpoints
    every S // 2 (saves_per_epoch 2). An SGD step of 1e-30 changes no weight, so eval_loss never improves
    after the first eval: with patience 2 the run ends at the third eval, before the epoch's end, completed,
    with its final eval and adapter."""
    from tunery import train

    out = tmp_path / "run"
    run = train({
        "base_model": str(tiny_llama), "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
        "datasets": [{"path": str(gsm8k_small), "type": "alpaca", "field_instruction": "question",
                      "field_output": "answer"}],
        "sequence_len": 256, "micro_batch_size": 2, "num_epochs": 1, "optimizer": "sgd", "learning_rate": 1e-30,
        "val_set_size": 4, "evals_per_epoch": 4, "saves_per_epoch": 2, "early_stopping_patience": 2,
        "output_dir": str(out), "progress_bar": False, "dataset_prepared_path": str(tmp_path / "prepared"),
    })
    steps = json.loads((run / "manifest.json").read_text())["total_steps"]
    e, c = steps // 4, steps // 2
    assert steps >= 12 and 3 * e < steps and e < c < 3 * e  # the scenario below happens inside the epoch
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "eval_loss" in r]
    assert evals == [e, 2 * e, 3 * e, 3 * e]  # three scheduled evals, then the final one
    assert max(r["step"] for r in rows if "loss" in r) == 3 * e
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{c}"]
    state = json.loads((run / "checkpoints" / f"step-{c}" / "trainer_state.json").read_text())
    first = next(r["eval_loss"] for r in rows if r["step"] == e and "eval_loss" in r)
    assert state["early_stopping"] == {"best": pytest.approx(first), "stale": (c // e) - 1}


def test_tunery_train_stays_callable_after_its_package_is_imported():
    """`tunery.train` names both the API function and the subpackage; importing the subpackage rebinds
    the name, and calling it must still train (here: reach config validation)."""
    import tunery
    import tunery.train.loop  # noqa: F401  (rebinds tunery.train to the package)
    from tunery.config import ConfigError

    assert isinstance(tunery.train, type(tunery))
    with pytest.raises(ConfigError, match="lora_rr"):
        tunery.train({"lora_rr": 8})


def test_loss_watchdog_fails_a_run_whose_loss_stays_high(tiny_llama, gsm8k_small, tmp_path):
    """A threshold under any real loss: the run fails after `patience` steps with the watchdog's message,
    status failed, the checkpoint written before it kept."""
    from tunery.train.loop import LossWatchdog, train

    out = tmp_path / "run"
    with pytest.raises(LossWatchdog, match=r"over 0.01 for 3 steps in a row .* at step 3\)"):
        train({
            "base_model": str(tiny_llama), "adapter": "lora", "lora_r": 4, "lora_target_linear": True,
            "datasets": [{"path": str(gsm8k_small), "type": "alpaca", "field_instruction": "question",
                          "field_output": "answer"}],
            "sequence_len": 256, "micro_batch_size": 2, "max_steps": 8, "save_steps": 2,
            "loss_watchdog_threshold": 0.01, "output_dir": str(out), "progress_bar": False,
            "dataset_prepared_path": str(tmp_path / "prepared"),
        })
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())["high_loss_steps"] == 2
    assert not (out / "adapter").exists()
