"""Distributed training on CPU (gloo, 2 processes through `tunery train --nproc 2`, i.e. torchrun).

- the per-step loss of a 2-process run equals the 1-process run with the same global batch (fp32,
  within 1e-5), for full fine-tuning and LoRA, with FSDP2 and with plain DDP;
- a checkpoint written by 2 processes (sharded, DCP) resumes on 1 and continues the same curve, and a
  1-process checkpoint resumes on 2 (FSDP);
- the final weights are written consolidated (safetensors folder / PEFT adapter) and match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

FSDP = "fsdp=[full_shard,auto_wrap]"
LORA = ("adapter=lora", "lora_r=4", "lora_alpha=8", "lora_target_linear=true", "learning_rate=0.01")
TESTS = Path(__file__).resolve().parent


class Runs:
    """Training runs of one tiny setup, each started once and shared by the tests."""

    def __init__(self, root: Path, model: Path, data: Path):
        self.root = root
        self.cfg = root / "base.yaml"
        self.cfg.write_text(yaml.safe_dump({
            "base_model": str(model),
            "datasets": [{"path": str(data), "type": "alpaca", "field_instruction": "question",
                          "field_output": "answer"}],
            "sequence_len": 128, "excess_length_strategy": "truncate", "micro_batch_size": 1, "gradient_accumulation_steps": 4, "max_steps": 4,
            "learning_rate": 1e-3, "save_steps": 2, "seed": 7, "val_set_size": 4, "eval_steps": 2, "logging_steps": 1,
            "progress_bar": False, "dataset_prepared_path": str(root / "prepared"),
        }))
        self.done: dict[str, Path] = {}

    def run(self, name: str, nproc: int, *overrides: str) -> Path:
        if name in self.done:
            return self.done[name]
        out = self.root / name
        cmd = [sys.executable, "-m", "tunery", "train", str(self.cfg), f"output_dir={out}", *overrides]
        if nproc > 1:
            cmd += ["--nproc", str(nproc)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNERY_DEBUG": "1"}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{name} failed:\n{p.stderr[-6000:]}"
        self.done[name] = out
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, gsm8k_small) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist"), tiny_llama, gsm8k_small)


def rows(run: Path, key: str = "loss") -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r}


def assert_same_curve(a: Path, b: Path, steps: list[int]) -> None:
    ra, rb = rows(a), rows(b)
    for s in steps:
        assert abs(ra[s]["loss"] - rb[s]["loss"]) < 1e-5, (s, ra[s]["loss"], rb[s]["loss"])
        assert abs(ra[s]["grad_norm"] - rb[s]["grad_norm"]) < 1e-4 * max(1.0, ra[s]["grad_norm"]), s
        assert ra[s]["trained_tokens"] == rb[s]["trained_tokens"], s
        assert ra[s]["lr"] == pytest.approx(rb[s]["lr"]), s
    ea, eb = rows(a, "eval_loss"), rows(b, "eval_loss")  # eval at steps 2 and 4 (and a save right after)
    for s in steps:
        if s in ea:
            assert abs(ea[s]["eval_loss"] - eb[s]["eval_loss"]) < 1e-5, (s, ea[s], eb[s])


def assert_same_tensors(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        assert (wa[k].float() - wb[k].float()).abs().max().item() < atol, k


def test_full_finetune_two_processes_match_one(runs):
    one = runs.run("full-1", 1)
    fsdp = runs.run("full-2-fsdp", 2, "gradient_accumulation_steps=2", FSDP)
    ddp = runs.run("full-2-ddp", 2, "gradient_accumulation_steps=2")
    assert_same_curve(one, fsdp, [1, 2, 3, 4])
    assert_same_curve(one, ddp, [1, 2, 3, 4])
    assert_same_tensors(one / "model" / "model.safetensors", fsdp / "model" / "model.safetensors")
    assert_same_tensors(one / "model" / "model.safetensors", ddp / "model" / "model.safetensors")
    assert (fsdp / "checkpoints" / "step-2" / "dcp" / ".metadata").is_file()  # sharded save
    assert not (ddp / "checkpoints" / "step-2" / "dcp").exists()  # replicas: rank 0 writes one copy
    assert json.loads((fsdp / "manifest.json").read_text())["world_size"] == 2
    assert json.loads((fsdp / "status.json").read_text())["state"] == "completed"


def test_lora_two_processes_match_one(runs):
    one = runs.run("lora-1", 1, *LORA)
    fsdp = runs.run("lora-2-fsdp", 2, *LORA, "gradient_accumulation_steps=2", FSDP)
    assert_same_curve(one, fsdp, [1, 2, 3, 4])
    # lr 1e-2 Adam steps turn float-rounding differences of tiny gradients into ~1e-5 weight differences
    assert_same_tensors(one / "adapter" / "adapter_model.safetensors", fsdp / "adapter" / "adapter_model.safetensors",
                        atol=1e-4)
    cfg = json.loads((fsdp / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    # the checkpoint holds only trainable tensors (no frozen base, no tied lm_head) plus the adapter
    ckpt = fsdp / "checkpoints" / "step-2"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert sum(f.stat().st_size for f in (ckpt / "dcp").iterdir()) < 2_000_000


def test_resume_two_processes_on_one(runs):
    """Sharded (DCP) checkpoint of 2 processes -> 1 process: the curve goes on as if never stopped."""
    runs.run("full-2-fsdp", 2, "gradient_accumulation_steps=2", FSDP)
    ckpt = runs.root / "full-2-fsdp" / "checkpoints" / "step-2"
    resumed = runs.run("full-2to1", 1, f"resume_from_checkpoint={ckpt}")
    assert_same_curve(runs.run("full-1", 1), resumed, [3, 4])
    assert min(rows(resumed)) == 3
    assert_same_tensors(runs.root / "full-1" / "model" / "model.safetensors", resumed / "model" / "model.safetensors")


def test_resume_lora_across_world_sizes(runs):
    """LoRA: 1-process checkpoint -> 2 processes (FSDP) and a 2-process one -> 1, both continue the curve."""
    one = runs.run("lora-1", 1, *LORA)
    two = runs.run("lora-2-fsdp", 2, *LORA, "gradient_accumulation_steps=2", FSDP)
    up = runs.run("lora-1to2", 2, *LORA, "gradient_accumulation_steps=2", FSDP,
                  f"resume_from_checkpoint={one / 'checkpoints' / 'step-2'}")
    down = runs.run("lora-2to1", 1, *LORA, f"resume_from_checkpoint={two / 'checkpoints' / 'step-2'}")
    for r in (up, down):
        assert_same_curve(one, r, [3, 4])
        assert_same_tensors(one / "adapter" / "adapter_model.safetensors", r / "adapter" / "adapter_model.safetensors",
                            atol=1e-4)


def test_gradients_match_one_process_at_tensor_level():
    """FSDP2 (tied / untied, shard_grad_op), HSDP, DDP, LoRA, CPU offload and QLoRA with sharded NF4
    storage: every gradient equals the one-process gradient of the same global batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(TESTS / "distributed_checks.py")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    for name in ("full-fsdp", "full-ddp", "full-hsdp", "lora-fsdp", "lora-ddp", "lora-fsdp-offload", "qlora-fsdp",
                 "nf4-sharded"):
        assert f"ok {name}" in p.stdout


# ------------------------------------------------------------------------------- fast, one process
def test_torchrun_command_and_options():
    from tunery.config import load_config
    from tunery.train.launch import torchrun_command
    from tunery.train.parallel import fsdp_options

    cmd = torchrun_command("c.yaml", ["lora_r=8"], 4)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in cmd and cmd[-5:] == ["-m", "tunery", "train", "c.yaml", "lora_r=8"]
    base = {"datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    o = fsdp_options(load_config({**base, "fsdp": ["full_shard", "auto_wrap"]}))
    assert o["reshard_after_forward"] and not o["offload"] and o["sharded_state"]
    o = fsdp_options(load_config({**base, "fsdp": ["shard_grad_op", "offload"],
                                  "fsdp_config": {"fsdp_state_dict_type": "FULL_STATE_DICT"}}))
    assert not o["reshard_after_forward"] and o["offload"] and not o["sharded_state"]
    o = fsdp_options(load_config({**base, "fsdp": ["full_shard"], "fsdp_config": {
        "fsdp_offload_params": True, "reshard_after_forward": False,
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}))
    assert o["offload"] and not o["reshard_after_forward"] and o["layer_cls"] == "LlamaDecoderLayer"


def test_decoder_blocks_and_optimizer_state_round_trip():
    """The FSDP units are the decoder layers; optimizer.pt (by position) <-> by name round-trips."""
    from transformers import LlamaConfig

    from tunery.models import build_own
    from tunery.train.dcp import _indexed_optimizer_state, _named_optimizer_state
    from tunery.train.parallel import decoder_blocks

    torch.manual_seed(0)
    m = build_own(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), torch.float32)
    assert decoder_blocks(m) == list(m.model.layers)
    assert decoder_blocks(m, "NoSuchLayer") == list(m.model.layers)
    assert decoder_blocks(m, "Block") == list(m.model.layers)
    decay = [p for n, p in m.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in m.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}])
    m(torch.randint(0, 64, (1, 8))).sum().backward()
    opt.step()
    saved = opt.state_dict()
    named = _named_optimizer_state(opt, m, saved)
    assert "model.embed_tokens.weight" in named["state"] and named["param_groups"][1]["weight_decay"] == 0.0
    back = _indexed_optimizer_state(opt, m, named)
    assert back["param_groups"] == saved["param_groups"]
    for i, st in saved["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][i][k], v)
