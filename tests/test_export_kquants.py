"""k-quant GGUF export (`--quant q6_k | q5_k_m | q4_k_m`): our Q4_K / Q5_K / Q6_K blocks read back with gguf's own
dequantizers (the layout llama.cpp reads), their error against the neighbouring types gguf writes, the
Q4_K_M mix of tensor types, and transformers loading the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

from tunery.export import gguf_from_folder
from tunery.export.gguf_writer import tensor_type
from tunery.export.kquants import quantize_k


def _representable_min_scale(nb: int, g: torch.Generator, top: int) -> torch.Tensor:
    """Values x = d*sc*q - dmin*m that Q4_K (top 15) or Q5_K (top 31) holds exactly: codes 0 and top in
    every sub-block, the largest scale and min codes 63, d and dmin f16."""
    d = (torch.rand(nb, 1, 1, generator=g) * 0.01 + 0.001).half().float()
    dmin = (torch.rand(nb, 1, 1, generator=g) * 0.01 + 0.001).half().float()
    sc = torch.randint(1, 64, (nb, 8, 1), generator=g).float()
    m = torch.randint(0, 64, (nb, 8, 1), generator=g).float()
    sc[:, 0], m[:, 1] = 63, 63
    q = torch.randint(0, top + 1, (nb, 8, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, top
    return ((d * sc) * q - (dmin * m)).reshape(nb, 256)


def _representable_q6_k(nb: int, g: torch.Generator) -> torch.Tensor:
    """x = d*sc*(q-32), one code 0 (the -32 end) per sub-block, |sc| 127 in every block, d f16."""
    d = (torch.rand(nb, 1, 1, generator=g) * 0.001 + 1e-4).half().float()
    sc = torch.randint(1, 128, (nb, 16, 1), generator=g).float() * (torch.randint(0, 2, (nb, 16, 1), generator=g) * 2 - 1)
    sc[:, 3] = 127
    q = torch.randint(1, 64, (nb, 16, 16), generator=g).float()
    q[..., 7] = 0
    return ((d * sc) * (q - 32)).reshape(nb, 256)


@pytest.mark.parametrize("kind,qtype,make", [
    ("q4_k", T.Q4_K, lambda nb, g: _representable_min_scale(nb, g, 15)),
    ("q5_k", T.Q5_K, lambda nb, g: _representable_min_scale(nb, g, 31)),
    ("q6_k", T.Q6_K, _representable_q6_k)])
def test_kquant_blocks_read_back_exactly_by_gguf(kind, qtype, make):
    """Values a block can hold come back exactly through gguf's dequantizer: every byte is where llama.cpp
    looks for it, and the scale search finds the exact scales."""
    x = make(64, torch.Generator().manual_seed(0)).reshape(16, 1024)
    blocks = quantize_k(x, kind)
    assert blocks.dtype == np.uint8 and blocks.shape == (16, 4 * {"q4_k": 144, "q5_k": 176, "q6_k": 210}[kind])
    back = dequantize(blocks, qtype)
    assert np.allclose(back, x.numpy(), rtol=1e-6, atol=1e-9), np.abs(back - x.numpy()).max()


def test_kquant_error_sits_between_the_neighbouring_types():
    """On weight-like rows (heavy tails, a few outliers): Q4_K (4.5 bits a weight) errs less than Q4_1 (5
    bits), Q5_K (5.5) less than Q5_1 (6), Q6_K (6.56) less than both and more than Q8_0 (8.5)."""
    g = torch.Generator().manual_seed(1)
    x = torch.distributions.StudentT(5.0).sample((256, 1024)) * 0.02
    x[torch.rand(x.shape, generator=g) < 1e-3] *= 8
    ref = x.numpy()

    def rmse(y):
        return float(np.sqrt(((y - ref) ** 2).mean()))

    ours = {k: rmse(dequantize(quantize_k(x, k), q)) for k, q in (("q4_k", T.Q4_K), ("q5_k", T.Q5_K), ("q6_k", T.Q6_K))}
    theirs = {q.name: rmse(dequantize(quantize(ref, q), q)) for q in (T.Q4_1, T.Q5_1, T.Q8_0)}
    assert ours["q4_k"] < theirs["Q4_1"] and ours["q5_k"] < theirs["Q5_1"], (ours, theirs)
    assert theirs["Q8_0"] < ours["q6_k"] < 0.6 * ours["q5_k"] < 0.6 * ours["q4_k"], (ours, theirs)


def test_kquant_rows_must_fit_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.zeros(4, 576), "q4_k")


def test_q4_k_m_mix_and_fallbacks():
    """Q6_K for the output matrix (the embedding when tied) and for attn_v / ffn_down in the first and last
    eighth of the layers and every third between; Q5_0 / Q8_0 / F16 for rows that do not fit a block."""
    n = 32
    v6 = [i for i in range(n) if tensor_type(f"blk.{i}.attn_v.weight", "q4_k_m", n, (1024, 4096), False) == T.Q6_K]
    assert v6 == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_type("blk.5.ffn_down.weight", "q4_k_m", n, (4096, 14336), False) == T.Q4_K
    assert tensor_type("blk.6.ffn_down.weight", "q4_k_m", n, (4096, 14336), False) == T.Q6_K
    assert tensor_type("blk.6.attn_q.weight", "q4_k_m", n, (4096, 4096), False) == T.Q4_K
    assert tensor_type("output.weight", "q4_k_m", n, (128256, 4096), False) == T.Q6_K
    assert tensor_type("token_embd.weight", "q4_k_m", n, (128256, 4096), False) == T.Q4_K
    assert tensor_type("token_embd.weight", "q4_k_m", n, (49152, 576), True) == T.Q8_0  # Q6_K, rows of 576
    assert tensor_type("blk.1.attn_q.weight", "q4_k_m", n, (576, 576), False) == T.Q5_0
    assert tensor_type("blk.1.attn_q.weight", "q6_k", n, (576, 576), False) == T.Q8_0
    assert tensor_type("blk.1.attn_q.weight", "q5_k_m", n, (576, 576), False) == T.Q5_1
    assert tensor_type("blk.1.attn_q.weight", "q5_k_m", n, (4096, 4096), False) == T.Q5_K
    assert tensor_type("blk.0.attn_v.weight", "q5_k_m", n, (1024, 4096), False) == T.Q6_K
    assert tensor_type("blk.1.attn_q.weight", "q4_k_m", n, (40, 40), False) == T.F16
    assert tensor_type("blk.1.attn_norm.weight", "q4_k_m", n, (4096,), False) == T.F32


def _tiny_llama_256(out, tok):
    """The Llama structure with rows that fit k-quant blocks (256 wide), 8 layers so the mix shows."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=(len(tok) + 15) // 16 * 16, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return model


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m", "q6_k"])
def test_kquant_gguf_loads_in_transformers(quant, tmp_path):
    """transformers reads the file (gguf_file=) and every weight it gets is the source weight up to the
    error of its type (so each tensor is in its place and orientation); the logits follow."""
    from test_export_gguf import SAMPLE, _byte_level_tokenizer, _load_gguf

    tok = _byte_level_tokenizer()
    src = _tiny_llama_256(tmp_path / "hf", tok)
    out = gguf_from_folder(tmp_path / "hf", tmp_path / "q" / f"m-{quant}.gguf", quant)
    r = GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert int(r.fields["general.file_type"].contents()) == {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}[quant]
    main = {"q4_k_m": T.Q4_K, "q5_k_m": T.Q5_K, "q6_k": T.Q6_K}[quant]
    if quant != "q6_k":
        assert types["blk.0.attn_v.weight"] == T.Q6_K and types["blk.1.attn_v.weight"] == main
        assert types["blk.3.ffn_down.weight"] == T.Q6_K and types["blk.4.ffn_down.weight"] == main
        assert types["output.weight"] == T.Q6_K and types["blk.2.ffn_gate.weight"] == main
    else:
        assert {t for n, t in types.items() if n.endswith(".weight") and "norm" not in n} == {T.Q6_K}
    hf, _ = _load_gguf(out)
    got = hf.state_dict()
    bound = {T.Q4_K: 0.12, T.Q5_K: 0.06, T.Q6_K: 0.03}
    for name, w in src.state_dict().items():
        if w.ndim < 2:
            assert torch.equal(got[name], w), name
            continue
        rel = ((got[name] - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()
        stem = name.rsplit(".", 2)[-2]
        kind = T.Q6_K if quant == "q6_k" or stem == "lm_head" or (stem in ("v_proj", "down_proj") and
                                                                     f".{name.split('.')[2]}." in ".0.3.6.7.") else main
        assert 0 < rel < bound[kind], (name, rel)
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = hf(ids).logits, src(ids).logits
    rel = ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()
    assert rel < {"q4_k_m": 0.3, "q5_k_m": 0.15, "q6_k": 0.1}[quant]  # a misplaced tensor gives ~1
