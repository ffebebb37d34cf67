"""Adapters on disk are PEFT's format: peft loads them onto the transformers model and gets Tunery's logits."""

from __future__ import annotations

import json

import pytest
import torch

from tunery.adapters import inject_lora, load_adapter, save_adapter
from tunery.models import load_model


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("targets, rslora, to_save", [
    (["q_proj", "v_proj"], False, None),
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True, None),
])
def test_peft_loads_tunery_adapter(tiny_llama, tmp_path, targets, rslora, to_save):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = load_model(str(tiny_llama))
    inject_lora(lm.model, targets, r=4, alpha=8, rslora=rslora, modules_to_save=to_save)
    randomize_lora(lm.model)
    out = save_adapter(lm.model, tmp_path / "adapter", str(tiny_llama), to_save)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] == rslora

    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lm.model.logits(lm.model(ids))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (ours - theirs).abs().max() < 1e-4

    # and back: a fresh Tunery model loading the adapter gives the same logits
    lm2 = load_model(str(tiny_llama))
    load_adapter(lm2.model, out)
    with torch.no_grad():
        again = lm2.model.logits(lm2.model(ids))
    assert torch.equal(again, ours)


def test_peft_adapter_loads_in_tunery(tiny_llama, tmp_path):
    """The other direction: an adapter made by peft applies in Tunery."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                       modules_to_save=["lm_head"]))
    randomize_lora(pm, 3)
    pm.save_pretrained(str(tmp_path / "peft"))
    ids = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = pm(ids).logits
    lm = load_model(str(tiny_llama))
    load_adapter(lm.model, tmp_path / "peft")
    with torch.no_grad():
        ours = lm.model.logits(lm.model(ids))
    assert (ours - theirs).abs().max() < 1e-4


def test_smollm2_matches_transformers(smol_path):
    """The own decoder on the real embedded model equals transformers' logits (fp32)."""
    from transformers import AutoModelForCausalLM

    lm = load_model("default")
    hf = AutoModelForCausalLM.from_pretrained(str(smol_path), dtype=torch.float32)
    ids = lm.tokenizer("Natalia sold clips to 48 of her friends in April.", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (lm.model.logits(lm.model(ids)) - hf(ids).logits).abs().max()
    assert diff < 1e-4
