"""Logits parity of the own decoder against transformers (fp32, tiny random configs), and packed rows."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from tunery.models import build_own, read_state_dict

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LT4 = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _configs() -> dict[str, transformers.PretrainedConfig]:
    c = COMMON
    return {
        "llama": transformers.LlamaConfig(**c, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}, rope_theta=500000.0),
        "mistral": transformers.MistralConfig(**c, sliding_window=5),
        "qwen2": transformers.Qwen2Config(**c, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 32}),
        "qwen3": transformers.Qwen3Config(**c, head_dim=16),
        "gemma": transformers.GemmaConfig(**c, head_dim=16),
        "gemma2": transformers.Gemma2Config(**{**c, "num_hidden_layers": 4}, head_dim=8, sliding_window=5,
                                            query_pre_attn_scalar=12, attn_logit_softcapping=3.0,
                                            final_logit_softcapping=4.0, layer_types=LT4),
        "gemma3_text": transformers.Gemma3TextConfig(**{**c, "num_hidden_layers": 4}, head_dim=8, sliding_window=5,
                                                     query_pre_attn_scalar=12, rope_theta=1e6,
                                                     rope_local_base_freq=1e4, layer_types=LT4,
                                                     rope_scaling={"rope_type": "linear", "factor": 4.0}),
    }


def _hf_model(cfg) -> torch.nn.Module:
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norms / biases so that every switch matters
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3) if cfg.model_type.startswith("gemma") else p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.08)
    return hf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, cfg in _configs().items():
        hf = _hf_model(cfg)
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        own = build_own(hf.config, torch.float32, state=read_state_dict(folder)).eval()
        out[name] = (hf, own)
    return out


@pytest.mark.parametrize("family", list(_configs()))
def test_logits_match_transformers(models, family):
    hf, own = models[family]
    torch.manual_seed(1)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 21))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        got = own.logits(own(ids))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text"])
def test_packed_row_equals_documents_alone(models, family):
    _, own = models[family]
    torch.manual_seed(2)
    a, b = torch.randint(0, COMMON["vocab_size"], (1, 9)), torch.randint(0, COMMON["vocab_size"], (1, 12))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(12)])[None]
    with torch.no_grad():
        both = own.logits(own(packed, pos))
        alone = torch.cat([own.logits(own(a)), own.logits(own(b))], 1)
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)


def test_rope_frequencies_stay_fp32_in_bf16(models):
    """A bf16 cast (or to_empty) must not round the rope frequencies: positions ~1000 would drift."""
    _, own = models["gemma3_text"]
    ref_g, ref_l = own.model.inv_freq.clone(), own.model.inv_freq_local.clone()
    half = copy.deepcopy(own).to(torch.bfloat16)
    assert half.model.inv_freq.dtype == torch.float32
    assert torch.equal(half.model.inv_freq, ref_g) and torch.equal(half.model.inv_freq_local, ref_l)
    empty = copy.deepcopy(own).to_empty(device="cpu")
    assert torch.equal(empty.model.inv_freq, ref_g)


def test_attn_implementation_sets_every_layer_and_flex_gives_the_same_logits(models):
    """`attn_implementation` (train/loop.py -> models.fused.set_attention): each value reaches every
    attention layer of the own decoder; FlexAttention (eager on CPU) gives the default's logits, packed
    rows included; the transformers fallback gets its own name, and varlen is refused there by name."""
    from tunery.models.decoder import Attention
    from tunery.models.fused import set_attention
    from tunery.models.hf_fallback import HFCausalLM

    hf, own = models["llama"]
    m = copy.deepcopy(own)
    for impl, backend in (("varlen", "flash"), ("flex", "flex"), ("eager", "sdpa"), ("sdpa", "sdpa")):
        set_attention(m, impl)
        assert {a.attn_backend for a in m.modules() if isinstance(a, Attention)} == {backend}
    torch.manual_seed(3)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 21))
    pos = torch.cat([torch.arange(9), torch.arange(12)]).expand(2, 21)
    set_attention(m, "flex")
    with torch.no_grad():
        torch.testing.assert_close(m.logits(m(ids, pos)), own.logits(own(ids, pos)), atol=1e-5, rtol=1e-5)
    fb = HFCausalLM(copy.deepcopy(hf))
    set_attention(fb, "sdpa")
    assert fb.hf.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation: varlen"):
        set_attention(fb, "varlen")


def test_the_trainer_applies_attn_implementation(models):
    from tunery.config import load_config
    from tunery.models.decoder import Attention
    from tunery.train.loop import _configure_kernels

    m = copy.deepcopy(models["llama"][1])
    cfg = {"base_model": "x", "adapter": "lora", "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    _configure_kernels(m, load_config({**cfg, "attn_implementation": "flex"}))
    assert {a.attn_backend for a in m.modules() if isinstance(a, Attention)} == {"flex"}
    _configure_kernels(m, load_config(cfg))  # auto: the fused switch's choice
    assert {a.attn_backend for a in m.modules() if isinstance(a, Attention)} == {"auto"}
