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
