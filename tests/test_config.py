"""Config: the common YAML style validates; typos, wrong types and conflicting keys give clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunery.config import Config, ConfigError, load_config

ISSUE_YAML = """
base_model: meta-llama/Meta-Llama-3.1-8B-Instruct
model_type: LlamaForCausalLM
tokenizer_type: AutoTokenizer
load_in_4bit: true
adapter: qlora
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_target_modules:
  - q_proj
  - v_proj
datasets:
  - path: your_org/your_dataset
    type: alpaca
sequence_len: 2048
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 3
learning_rate: 0.0002
output_dir: ./outputs/llama3-qlora-run1
"""


def test_common_style_config_validates():
    cfg = load_config(yaml.safe_load(ISSUE_YAML))
    assert cfg.adapter == "qlora" and cfg.load_in_4bit
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.accumulation_steps == 4
    assert cfg.datasets[0].type == "alpaca"


# The shape of a QLoRA example config of the most common YAML trainer: many keys left empty, some for
# features Tunery does not have, an optimizer name of bitsandbytes'.
COMMON_QLORA_YAML = """
base_model: NousResearch/Meta-Llama-3-8B
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
load_in_8bit: false
load_in_4bit: true
strict: false
datasets:
  - path: data/alpaca.jsonl
    type: alpaca
dataset_prepared_path:
val_set_size: 0.05
output_dir: ./outputs/qlora-out
adapter: qlora
lora_model_dir:
sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
lora_target_linear: true
lora_fan_in_fan_out:
wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:
gradient_accumulation_steps: 4
micro_batch_size: 1
num_epochs: 4
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false
gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true
warmup_steps: 10
evals_per_epoch: 4
eval_table_size:
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: "<|end_of_text|>"
gradient_checkpointing_kwargs:
  use_reentrant: true
eval_sample_packing: false
loss_watchdog_threshold: 5.0
loss_watchdog_patience: 3
dataset_processes: 4
plugins:
  - axolotl.integrations.liger.LigerPlugin
liger_rms_norm: true
save_safetensors: true
"""


def test_a_common_trainers_example_config_validates():
    """Empty keys mean "not set"; keys for features Tunery lacks pass when they ask for nothing; the
    paging optimizer runs as adamw; evals_per_epoch / saves_per_epoch are honoured (test_eval_schedule)."""
    cfg = load_config(yaml.safe_load(COMMON_QLORA_YAML))
    assert cfg.optimizer == "adamw" and cfg.fp16 is False and cfg.early_stopping_patience is None
    assert cfg.evals_per_epoch == 4 and cfg.saves_per_epoch == 1 and cfg.eval_steps is None
    assert "flash_attention" not in cfg.to_yaml_dict()  # accepted keys that do nothing are not kept
    assert cfg.max_grad_norm == 1.0 and load_config({"max_grad_norm": None}).max_grad_norm is None  # null is a value
    assert cfg.loss_watchdog_threshold == 5.0 and cfg.dataset_num_proc == 4
    assert load_config({"save_strategy": "epoch", "auto_resume_from_checkpoints": True}).saves_per_epoch == 1
    assert problems_of({"save_strategy": "epoch", "save_steps": 10}) == [
        "save_strategy: epoch and save_steps are both set; set only one"]
    entry = load_config({"datasets": [{"path": "x.jsonl", "type": "chat_template", "field_messages": "conversations",
                                       "message_field_role": "from", "message_field_content": "value"}]}).datasets[0]
    assert entry.message_property_mappings == {"role": "from", "content": "value"}


def test_common_keys_that_ask_for_what_tunery_lacks_are_errors():
    data = yaml.safe_load(COMMON_QLORA_YAML)
    data.update(deepspeed="deepspeed_configs/zero2.json", xformers_attention=True, group_by_length=True,
                optimizer="paged_adamw_8bit", lora_dropuot=None, save_safetensors=False)
    probs = problems_of(data)
    assert any(p.startswith("deepspeed:") and "fsdp" in p for p in probs), probs
    assert any(p.startswith("xformers_attention: True is not supported") for p in probs)
    assert any(p.startswith("group_by_length:") and "sample_packing" in p for p in probs)
    assert any(p.startswith("optimizer: paged_adamw_8bit is not available") and "adamw" in p for p in probs)
    assert any("lora_dropuot" in p and "unknown key" in p for p in probs)  # unknown stays unknown, null or not
    assert any(p.startswith("save_safetensors: False") and "safetensors" in p for p in probs)
    assert problems_of({"eval_steps": 10, "evals_per_epoch": 4}) == [
        "eval_steps and evals_per_epoch are both set; set only one"]
    assert problems_of({"early_stopping_patience": 3, "eval_steps": 5}) == [
        "early_stopping_patience needs eval data: set val_set_size or test_datasets"]
    assert problems_of({"early_stopping_patience": 3, "val_set_size": 0.1}) == [
        "early_stopping_patience needs evals during the run: set eval_steps or evals_per_epoch"]


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(data)
    return e.value.problems


def test_unknown_keys_get_did_you_mean():
    probs = problems_of({"lerning_rate": 1e-4, "datasets": [{"path": "x", "tpye": "alpaca"}]})
    assert any("lerning_rate" in p and "learning_rate" in p for p in probs)
    assert any("datasets.0.tpye" in p and "'type'" in p for p in probs)


def test_wrong_type_names_the_key():
    probs = problems_of({"micro_batch_size": "two"})
    assert len(probs) == 1 and probs[0].startswith("micro_batch_size:")
    probs = problems_of({"offload_strategy": "everything"})
    assert len(probs) == 1 and probs[0].startswith("offload_strategy:") and "activations" in probs[0]


@pytest.mark.parametrize("data, needle", [
    ({"adapter": "qlora"}, "load_in_4bit"),
    ({"batch_size": 8, "gradient_accumulation_steps": 2}, "batch_size and gradient_accumulation_steps"),
    ({"warmup_steps": 10, "warmup_ratio": 0.1}, "warmup_steps and warmup_ratio"),
    ({"lora_target_linear": True}, "adapter is absent"),
    ({"gradient_checkpointing": True, "offload_keep_on_gpu": 4, "offload_save_mlp": 2},
     "offload_keep_on_gpu, offload_save_mlp work with gradient_checkpointing: offload, and gradient_checkpointing is true"),
    ({"offload_strategy": "activations"}, "offload_strategy work with gradient_checkpointing: offload"),
])
def test_cross_field_rules(data, needle):
    assert any(needle in p for p in problems_of(data))


def test_offload_keys_at_their_defaults_pass_without_offload():
    """A resolved config (defaults written out, as a run directory stores it) loads again; only keys set
    away from their defaults without gradient_checkpointing: offload are refused."""
    cfg = load_config({"datasets": [{"path": "a.jsonl"}]})
    again = load_config(cfg.to_yaml_dict())
    assert again.gradient_checkpointing is False and again.offload_keep_on_gpu == 0 and again.offload_save_mlp == "auto"
    load_config({"gradient_checkpointing": "offload", "offload_strategy": "activations", "offload_keep_on_gpu": 4,
                 "offload_save_mlp": 2, "offload_save_mlp_kept": 2})


def test_dotted_overrides():
    cfg = load_config({"datasets": [{"path": "a.jsonl"}]}, ["lora_r=8", "datasets.0.path=x.jsonl", "grpo.beta=0.04",
                                                            "bf16=false"])
    assert cfg.lora_r == 8 and cfg.datasets[0].path == "x.jsonl" and cfg.grpo.beta == 0.04 and cfg.bf16 is False
    with pytest.raises(ConfigError, match="past the end"):
        load_config({"datasets": [{"path": "a"}]}, ["datasets.3.path=x"])


def test_batch_size_sets_accumulation():
    assert load_config({"batch_size": 8, "micro_batch_size": 2}).accumulation_steps == 4


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunery", *args], capture_output=True, text=True, timeout=120)


def test_cli_validate_and_schema(tmp_path: Path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"datasets": [{"path": str(data), "type": "alpaca"}]}))
    r = run_cli("validate", str(good))
    assert r.returncode == 0 and r.stdout.strip() == "valid", r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rr: 8\nmicro_batch_size: x\ndatasets:\n  - path: missing.jsonl\n")
    r = run_cli("validate", str(bad))
    assert r.returncode == 2
    assert "lora_rr" in r.stderr and "did you mean 'lora_r'" in r.stderr and "micro_batch_size" in r.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text("datasets:\n  - path: nope.jsonl\n")
    r = run_cli("validate", str(missing))
    assert r.returncode == 2 and "datasets.0.path: file not found: nope.jsonl" in r.stderr
    r = run_cli("validate", str(tmp_path / "absent.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    r = run_cli("schema")
    schema = json.loads(r.stdout)
    assert "lora_r" in schema["properties"] and "datasets" in schema["properties"]


def test_every_verb_has_help():
    for verb in ["train", "validate", "schema", "preprocess", "chat", "plan", "merge", "export", "serve", "eval",
                 "studio"]:
        r = run_cli(verb, "--help")
        assert r.returncode == 0 and "usage: tunery" in r.stdout, verb


def test_config_roundtrip_is_stable():
    cfg = load_config({"datasets": [{"path": "a.jsonl"}], "lora_r": 4, "adapter": "lora"})
    again = Config.model_validate(cfg.to_yaml_dict())
    assert again == cfg


def test_offload_save_mlp_takes_a_count_or_auto():
    assert load_config({"offload_save_mlp": 3, "gradient_checkpointing": "offload"}).offload_save_mlp == 3
    assert load_config({}).offload_save_mlp == "auto"
    for bad in (-1, "all"):
        probs = problems_of({"offload_save_mlp": bad})
        assert any("offload_save_mlp" in p for p in probs), probs


def test_compat_keys_are_not_config_fields():
    """A key handled by config/compat.py that became a real field would never reach it."""
    from tunery.config.compat import ENTRY_MAPPED, FOREIGN, MAPPED
    from tunery.config.data import DatasetEntry

    assert not (FOREIGN.keys() | MAPPED.keys()) & Config.model_fields.keys()
    assert not ENTRY_MAPPED.keys() & DatasetEntry.model_fields.keys()
    assert all(v in Config.model_fields for m in MAPPED.values() for v in m("epoch") | m(True))
