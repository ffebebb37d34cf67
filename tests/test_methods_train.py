"""Preference methods through the real trainer: `tunery.train` on a tiny random Llama for two steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hh_small(tmp_path_factory) -> Path:
    """24 short HH-RLHF pairs from the shipped sample."""
    out = tmp_path_factory.mktemp("hh") / "hh.jsonl"
    rows = []
    for line in (REPO / "examples" / "data" / "hh_rlhf_harmless_sample.jsonl").read_text().splitlines():
        row = json.loads(line)
        if len(row["chosen"]) < 500 and len(row["rejected"]) < 500:
            rows.append(line)
        if len(rows) == 24:
            break
    out.write_text("\n".join(rows) + "\n")
    return out


@pytest.mark.parametrize("rl", ["dpo", "rm"])
def test_preference_methods_train_end_to_end(rl, tiny_llama, hh_small, tmp_path):
    # tunery.train.loop.train: the function `tunery.train` is shadowed by the subpackage once that is imported
    from tunery.train.loop import train

    cfg = {"base_model": str(tiny_llama), "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
           "rl": rl, "datasets": [{"path": str(hh_small), "type": "preference"}], "val_set_size": 4,
           "sequence_len": 128, "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "seed": 3,
           "output_dir": str(tmp_path / "run"), "progress_bar": False,
           "dataset_prepared_path": str(tmp_path / "prepared")}
    run = train(cfg)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals, "the held-out pairs are evaluated at the end"
    if rl == "dpo":
        assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 1
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected"):
            assert key in steps[0] and f"eval_{key}" in evals[-1]
    else:
        assert "accuracy" in steps[0] and "eval_accuracy" in evals[-1]
        heads = list(run.glob("**/score_head.safetensors"))
        assert heads, "the reward head is saved with the run"
        from tunery.methods.heads import load_score_head
        from tunery.models import load_model

        lm = load_model(str(tiny_llama))
        head = load_score_head(lm.model, str(heads[0]))
        assert head.weight.shape == (1, 64) and head.bias is None
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_kto_full_finetune_with_precomputed_reference(tiny_llama, tmp_path, monkeypatch):
    """Full fine-tuning KTO with `precompute_ref_log_probs`: the reference log-probs (and the fixed mismatched
    pairs of the KL point) are computed once, cached by data fingerprint, and reach the loss through the
    collator; at step 1 policy = reference, so the implicit rewards are 0."""
    from tunery.train.loop import train

    monkeypatch.setenv("TUNERY_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "kto.jsonl"
    lines = [x for x in (REPO / "examples" / "data" / "hh_rlhf_harmless_kto_sample.jsonl").read_text().splitlines()
             if len(x) < 900][:16]
    data.write_text("\n".join(lines) + "\n")
    cfg = {"base_model": str(tiny_llama), "rl": "kto", "precompute_ref_log_probs": True,
           "datasets": [{"path": str(data), "type": "kto"}], "sequence_len": 128, "micro_batch_size": 4,
           "max_steps": 2, "learning_rate": 1e-3, "seed": 3, "output_dir": str(tmp_path / "run"),
           "progress_bar": False, "dataset_prepared_path": str(tmp_path / "prepared")}
    run = train(cfg)
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert list((tmp_path / "cache").rglob("*-train.json")), "the reference log-probs are cached"
    assert (run / "model" / "model.safetensors").is_file() or list((run / "model").glob("*.safetensors"))


def test_step_rows_are_written_in_order_with_their_tokens(tiny_llama, gsm8k_small, tmp_path):
    """The step numbers reach the host after the next step is queued (no sync per micro-batch): the
    rows still come in step order, each eval row after its step's row, the token count is cumulative
    and a checkpoint records the tokens of its own step."""
    from tunery.train.loop import train

    cfg = {"base_model": str(tiny_llama), "adapter": "lora", "lora_r": 4, "lora_target_linear": True,
           "datasets": [{"path": str(gsm8k_small), "type": "alpaca", "field_instruction": "question",
                         "field_output": "answer"}],
           "sequence_len": 256, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 5,
           "learning_rate": 1e-3, "val_set_size": 4, "eval_steps": 2, "save_steps": 2, "seed": 5,
           "output_dir": str(tmp_path / "run"), "progress_bar": False,
           "dataset_prepared_path": str(tmp_path / "prepared")}
    run = train(cfg)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step" in r]
    kinds = [(r["step"], "eval" if "eval_loss" in r else "train") for r in rows]
    assert kinds == [(1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"), (4, "eval"),
                     (5, "train"), (5, "eval")], kinds
    train_rows = [r for r in rows if "loss" in r and "eval_loss" not in r]
    tokens = [r["tokens"] for r in train_rows]
    assert all(b > a for a, b in zip(tokens, tokens[1:])) and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in train_rows)
    state = json.loads((run / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["tokens_seen"] == train_rows[3]["tokens"]


def test_a_run_gives_the_process_its_signal_handlers_back(tiny_llama, gsm8k_small, tmp_path):
    """During a run SIGTERM/SIGINT mean "checkpoint and stop"; after it the process's own handlers are
    back: a notebook's Ctrl-C interrupts again, and a later forked pool dies of its SIGTERM. So is
    torch's deterministic mode, which `deterministic: true` turned on for the run."""
    import signal

    from tunery.train.loop import train

    def mine(*_):
        return None

    cfg = {"base_model": str(tiny_llama), "adapter": "lora", "lora_r": 4,
           "datasets": [{"path": str(gsm8k_small), "type": "alpaca", "field_instruction": "question",
                         "field_output": "answer"}],
           "sequence_len": 512, "micro_batch_size": 1, "max_steps": 1, "output_dir": str(tmp_path / "run"),
           "progress_bar": False, "dataset_prepared_path": str(tmp_path / "prepared"), "deterministic": True}
    old = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGINT)}
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        train(cfg)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
