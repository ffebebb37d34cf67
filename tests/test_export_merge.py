"""Merge: a run's adapter folded into its base, written as an HF folder that transformers loads with the
same logits; run directories, checkpoints and adapter folders all resolve; `tunery chat` on a run."""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml

from tunery.adapters import inject_lora, save_adapter
from tunery.export.merge import merge_run
from tunery.export.weights import parse_size
from tunery.inference import chat_main, describe_target, load_for_inference
from tunery.models import load_model


def _make_run(base, root, targets=("q_proj", "v_proj", "gate_proj", "down_proj"), to_save=None, seed=0):
    lm = load_model(str(base))
    inject_lora(lm.model, list(targets), r=4, alpha=8, modules_to_save=to_save)
    g = torch.Generator().manual_seed(seed)
    for p in lm.model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    root.mkdir(parents=True, exist_ok=True)
    save_adapter(lm.model, root / "adapter", str(base), to_save)
    lm.tokenizer.save_pretrained(str(root / "adapter"))
    (root / "config.yaml").write_text(yaml.safe_dump({"base_model": str(base), "adapter": "lora"}))
    return lm


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    lm = _make_run(tiny_llama, root)
    ids = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = lm.model.logits(lm.model(ids))
    return root, ids, ref


def test_merge_matches_transformers(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, ids, ref = run
    out = merge_run(root, tmp_path / "merged", max_shard_size="1MB")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        assert (hf(ids).logits - ref).abs().max() < 1e-4
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list)
                                                       else [gen["eos_token_id"]])


def test_merge_with_trained_lm_head(tiny_llama, tmp_path):
    """modules_to_save=[lm_head] unties the head: the merged folder carries its own lm_head."""
    from transformers import AutoModelForCausalLM

    lm = _make_run(tiny_llama, tmp_path / "run", targets=("q_proj",), to_save=["lm_head"], seed=2)
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = lm.model.logits(lm.model(ids))
    out = merge_run(tmp_path / "run", tmp_path / "merged", dtype="float32")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        assert (hf(ids).logits - ref).abs().max() < 1e-4


def test_targets_resolve(run, tmp_path):
    root, ids, ref = run
    info = describe_target(root)
    assert info["kind"] == "adapter" and info["run_dir"] == root
    ckpt = root / "checkpoints" / "step-5"
    ckpt.mkdir(parents=True)
    import shutil

    shutil.copytree(root / "adapter", ckpt / "adapter")
    info = describe_target(ckpt)
    assert info["kind"] == "adapter" and info["run_dir"] == root and info["config"].base_model
    model, tok, info = load_for_inference(ckpt, device="cpu", dtype="float32")
    with torch.no_grad():
        assert (model.logits(model(ids)) - ref).abs().max() < 1e-5
    assert describe_target(root / "adapter")["kind"] == "adapter"
    assert describe_target("default")["kind"] == "base"
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("base_model: default\n")
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        describe_target(tmp_path / "unfinished")


def test_chat_main_once_and_interactive(run):
    root, _, _ = run
    out = io.StringIO()
    assert chat_main(str(root), prompt="Hello", max_new_tokens=4, temperature=0.0, stdout=out) == 0
    assert out.getvalue().endswith("\n")
    out = io.StringIO()
    rc = chat_main(str(root), system="Be brief.", max_new_tokens=3, stdin=io.StringIO("hi\n/reset\nagain\n/exit\nnever\n"),
                   stdout=out)
    assert rc == 0 and "(history cleared)" in out.getvalue()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 1024**3 and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


def test_train_with_save_merged_writes_the_merged_model(tiny_llama, gsm8k_small, tmp_path):
    """`save_merged: true` on an adapter run: RUN/merged is written at the end, and its logits are the
    run's (base + trained adapter) as Tunery loads the run."""
    from transformers import AutoModelForCausalLM

    from tunery.train.loop import train

    cfg = {"base_model": str(tiny_llama), "adapter": "lora", "lora_r": 4, "lora_target_linear": True,
           "datasets": [{"path": str(gsm8k_small), "type": "alpaca", "field_instruction": "question",
                         "field_output": "answer"}],
           "sequence_len": 256, "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-2,
           "save_merged": True, "output_dir": str(tmp_path / "run"), "progress_bar": False,
           "dataset_prepared_path": str(tmp_path / "prepared")}
    run = train(cfg)
    assert (run / "merged" / "config.json").is_file()
    model, _, _ = load_for_inference(run, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(3))
    hf = AutoModelForCausalLM.from_pretrained(str(run / "merged"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    with torch.no_grad():
        ref = model.logits(model(ids))
        assert (hf(ids).logits - ref).abs().max() < 1e-4
        assert (base(ids).logits - ref).abs().max() > 1e-3  # the adapter trained: not the base
