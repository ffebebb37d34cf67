"""GGUF export: transformers reads the files back (gguf_file=) and gets the merged model's logits.

Tiny random models of every family the own decoder runs, with a small trained tokenizer (a GGUF
with SmolLM2's 49k-token vocabulary takes transformers ~20 s per read), plus SmolLM2 itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from tunery.export import export_run, gguf_from_folder
from tunery.export.gguf_writer import check_quant, permute_rotary
from tunery.models import load_model

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ["The quick brown fox jumps over the lazy dog.", "Natalia sold clips to 48 of her friends in April.",
        "How many clips did Natalia sell altogether in April and May?", "def f(x):\n    return x * 2  # doubles"] * 20
SAMPLE = "Natalia sold 48 clips to her friends in April."


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def _spm_tokenizer():
    """Sentencepiece-style BPE (byte fallback, ▁ for spaces) as Llama 2 / Mistral ship it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    t.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300))
    learned = json.loads(t.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for tok_text in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(tok_text, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges)
    tok.chat_template = CHATML
    return tok


def _tiny(family: str, out: Path, tok, seed: int = 0) -> Path:
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    n_vocab = (len(tok) + 15) // 16 * 16
    common = dict(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    extra: dict = {
        "qwen3": dict(head_dim=128),  # transformers reads qwen3 GGUFs back with its default head_dim
        "gemma": dict(head_dim=16), "gemma2": dict(head_dim=16),
        "gemma3_text": dict(head_dim=16, num_hidden_layers=6),  # one full-attention layer in six
    }.get(family, {})
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "gemma": GemmaConfig, "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig}[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**{**common, **extra}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial norms and biases: their layout gets tested
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def bl_tok():
    return _byte_level_tokenizer()


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_gguf_roundtrip_through_transformers(family, bl_tok, tmp_path):
    src = _tiny(family, tmp_path / "hf", bl_tok)
    lm = load_model(str(src))
    ids = lm.tokenizer(SAMPLE, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = lm.model.logits(lm.model(ids))
    for quant, tol in (("f32", 1e-4), ("f16", 1e-2)):
        out = gguf_from_folder(src, tmp_path / quant / f"m-{quant}.gguf", quant)
        hf, tok = _load_gguf(out)
        with torch.no_grad():
            got = hf(ids).logits
        assert (got - ref).abs().max().item() < tol, (family, quant)
        assert tok(SAMPLE).input_ids == ids[0].tolist()
    r = GGUFReader(str(out))
    assert _field(r, "tokenizer.chat_template") == CHATML
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.eos_token_id") == bl_tok.eos_token_id
    assert _field(r, "general.file_type") == 1  # MOSTLY_F16


def test_gguf_q8_0_greedy_matches(bl_tok, tmp_path):
    src = _tiny("llama", tmp_path / "hf", bl_tok, seed=3)
    lm = load_model(str(src))
    out = gguf_from_folder(src, tmp_path / "q" / "m.gguf", "q8_0")
    r = GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    hf, _ = _load_gguf(out)
    ids = lm.tokenizer(SAMPLE, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, ids.shape[1]:].tolist()
        ref = lm.model.logits(lm.model(ids))
        assert (hf(ids).logits - ref).abs().max() < 0.1
    from tunery.generate import SamplingParams, generate

    ours = generate(lm.model, [ids[0].tolist()], SamplingParams(max_new_tokens=20, ignore_eos=True), lm.tokenizer)
    assert ours[0].token_ids == theirs


def test_gguf_gemma_layout(bl_tok, tmp_path):
    """Gemma (v1) GGUFs are not readable by transformers: check the layout with gguf's reader."""
    import numpy as np
    from safetensors.torch import load_file

    src = _tiny("gemma", tmp_path / "hf", bl_tok)
    out = gguf_from_folder(src, tmp_path / "m.gguf", "f32")
    r = GGUFReader(str(out))
    assert _field(r, "general.architecture") == "gemma"
    assert _field(r, "gemma.attention.key_length") == 16
    state = load_file(str(src / "model.safetensors"))
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    assert "output.weight" not in tensors  # tied
    assert np.allclose(tensors["blk.1.attn_norm.weight"], state["model.layers.1.input_layernorm.weight"].numpy() + 1)
    assert np.allclose(tensors["blk.0.attn_q.weight"], state["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_llama_rotary_permutation():
    """The permutation matches llama.cpp's: pairs (i, i + d/2) of each head become neighbours."""
    heads, d = 2, 8
    w = torch.arange(heads * d, dtype=torch.float32)[:, None]
    p = permute_rotary(w, heads)[:, 0].tolist()
    assert p[:8] == [0, 4, 1, 5, 2, 6, 3, 7] and p[8:] == [8, 12, 9, 13, 10, 14, 11, 15]


def test_spm_tokenizer_roundtrip(tmp_path):
    """A sentencepiece-style vocabulary (byte fallback) is written as tokenizer model `llama` and reads back."""
    tok = _spm_tokenizer()
    src = _tiny("llama", tmp_path / "hf", tok)
    out = gguf_from_folder(src, tmp_path / "g" / "m.gguf", "f32")
    r = GGUFReader(str(out))
    assert _field(r, "tokenizer.ggml.model") == "llama"
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[0] == 2 and types[3] == 6  # <unk> UNKNOWN, <0x00> BYTE
    hf, tok2 = _load_gguf(out)
    for text in (SAMPLE, "  two spaces, digits 123 and ünïcödé"):
        assert tok2(text).input_ids == tok(text).input_ids
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    lm = load_model(str(src))
    with torch.no_grad():
        assert (hf(ids).logits - lm.model.logits(lm.model(ids))).abs().max() < 1e-4


def test_unknown_quant_lists_types():
    with pytest.raises(ValueError, match="f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m"):
        check_quant("q3_k_s")
    assert check_quant("Q4_K_M") == "q4_k_m"


def test_llama3_rope_scaling_writes_rope_freqs(bl_tok, tmp_path):
    src = _tiny("llama", tmp_path / "hf", bl_tok)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (src / "config.json").write_text(json.dumps(cfg))
    out = gguf_from_folder(src, tmp_path / "m.gguf", "bf16")
    r = GGUFReader(str(out))
    rf = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    factors = torch.tensor(rf.data.copy())
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
    assert next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").tensor_type.name == "BF16"


def test_export_run_with_adapter(bl_tok, tmp_path):
    """A LoRA run exports with the adapter folded in: the GGUF's logits are the adapted model's."""
    import yaml

    from tunery.adapters import inject_lora, save_adapter

    src = _tiny("qwen2", tmp_path / "base", bl_tok)
    lm = load_model(str(src))
    inject_lora(lm.model, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    for p in lm.model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    run = tmp_path / "run"
    save_adapter(lm.model, run / "adapter", str(src))
    (run / "config.yaml").write_text(yaml.safe_dump({"base_model": str(src), "adapter": "lora"}))
    out = export_run(str(run), fmt="gguf", quant="f32")
    assert out == run / "export" / "run-f32.gguf" and out.is_file()
    ids = lm.tokenizer(SAMPLE, return_tensors="pt").input_ids
    hf, _ = _load_gguf(out)
    with torch.no_grad():
        assert (hf(ids).logits - lm.model.logits(lm.model(ids))).abs().max() < 1e-4


@pytest.mark.slow
def test_smollm2_gguf(smol_path, tmp_path):
    """The embedded SmolLM2 (~35 s: transformers parses the 49k-token vocabulary twice): q8_0 continues a
    prompt greedily like the model; f16 equals the model with f16-rounded weights (so every difference
    from fp32 is rounding, not layout) and picks the fp32 model's top token at every position."""
    from transformers import AutoModelForCausalLM

    from tunery.generate import SamplingParams, generate

    lm = load_model("default")
    ids = lm.tokenizer("Natalia sold clips to 48 of her friends in April, and then", return_tensors="pt").input_ids
    out = gguf_from_folder(smol_path, tmp_path / "smol-q8_0.gguf", "q8_0")
    r = GGUFReader(str(out))
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2" and "<|im_start|>" in _field(r, "tokenizer.chat_template")
    assert _field(r, "tokenizer.ggml.eos_token_id") == 2
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, ids.shape[1]:].tolist()
    ours = generate(lm.model, [ids[0].tolist()], SamplingParams(max_new_tokens=20, ignore_eos=True), lm.tokenizer)
    assert ours[0].token_ids == theirs
    f16 = gguf_from_folder(smol_path, tmp_path / "f16" / "smol-f16.gguf", "f16")
    hf16 = AutoModelForCausalLM.from_pretrained(str(f16.parent), gguf_file=f16.name, dtype=torch.float32)
    rounded = load_model("default")
    rounded.model.half().float()
    with torch.no_grad():
        got = hf16(ids).logits
        assert (got - rounded.model.logits(rounded.model(ids))).abs().max() < 1e-3
        assert torch.equal(got.argmax(-1), lm.model.logits(lm.model(ids)).argmax(-1))
