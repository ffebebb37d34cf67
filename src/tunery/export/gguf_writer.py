"""Write a model of the own decoder's families as GGUF (llama.cpp's format) with the `gguf` package.

Tensor names come from gguf's HF-to-GGUF name map. Two layout changes follow llama.cpp:
- llama (and mistral, which llama.cpp runs as llama): the rows of q_proj / k_proj are permuted from
  HF's rotate-half rotary layout to the interleaved one llama.cpp's llama graph uses;
- Gemma: norm weights are stored as 1 + w (HF stores w and adds 1 at run time).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    get_tensor_name_map,
)
from gguf.quants import quantize
from tqdm.auto import tqdm

from ..atomic import atomic_output
from .gguf_vocab import build_vocab
from .kquants import quantize_k

# HF model_type -> llama.cpp architecture
GGUF_ARCH = {
    "llama": MODEL_ARCH.LLAMA, "mistral": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2, "qwen3": MODEL_ARCH.QWEN3,
    "gemma": MODEL_ARCH.GEMMA, "gemma2": MODEL_ARCH.GEMMA2, "gemma3_text": MODEL_ARCH.GEMMA3,
}
# --quant name -> (tensor type of most 2-D weights, general.file_type)
QUANT_TYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q6_k": (GGMLQuantizationType.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q5_k_m": (GGMLQuantizationType.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q4_k_m": (GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}
_KQUANTS = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)
# what a matrix whose rows do not fit a type's block takes instead (llama.cpp's choices)
_FALLBACK = {GGMLQuantizationType.Q4_K: GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_K: GGMLQuantizationType.Q5_1,
             GGMLQuantizationType.Q6_K: GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0: GGMLQuantizationType.F16,
             GGMLQuantizationType.Q5_1: GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0: GGMLQuantizationType.F16}
_BLOCK = {**dict.fromkeys(_KQUANTS, 256), **dict.fromkeys(_FALLBACK.keys() - set(_KQUANTS), 32)}


def check_quant(quant: str) -> str:
    q = quant.lower()
    if q not in QUANT_TYPES:
        raise ValueError(f"GGUF quant type {quant!r} is not available; choose one of {', '.join(QUANT_TYPES)} "
                         "(other k-quants: write f16 here, then run llama.cpp's llama-quantize)")
    return q


def _more_bits(layer: int, n_layers: int) -> bool:
    """The layers whose attn_v / ffn_down a Q4_K_M or Q5_K_M file keeps in Q6_K: the first and last eighth, and every
    third one between (the usual Q4_K_M mix)."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(gname: str, quant: str, n_layers: int, shape: tuple[int, ...], tied: bool) -> GGMLQuantizationType:
    """The GGUF type of one tensor: 1-D tensors (norms, biases, rope factors) stay F32; a Q4_K_M / Q5_K_M
    file puts the output matrix (the token embedding when tied) and half the layers' attn_v and ffn_down in
    Q6_K; a matrix whose rows do not fit the type's block falls back (Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0; those -> F16)."""
    qtype = QUANT_TYPES[quant][0]
    if len(shape) < 2 or gname == "rope_freqs.weight" or qtype == GGMLQuantizationType.F32:
        return GGMLQuantizationType.F32
    if quant in ("q4_k_m", "q5_k_m"):
        parts = gname.split(".")
        if gname == "output.weight" or (tied and gname == "token_embd.weight"):
            qtype = GGMLQuantizationType.Q6_K
        elif parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down") and _more_bits(int(parts[1]), n_layers):
            qtype = GGMLQuantizationType.Q6_K
    while qtype in _BLOCK and shape[-1] % _BLOCK[qtype]:
        qtype = _FALLBACK[qtype]
    return qtype


def check_family(hf_config: dict[str, Any]) -> str:
    mt = hf_config.get("model_type")
    if mt not in GGUF_ARCH:
        raise ValueError(f"GGUF export covers the own decoder's families ({', '.join(GGUF_ARCH)}); model_type "
                         f"{mt!r} is not one of them. Export --format safetensors and use llama.cpp's converter.")
    return mt


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (also for biases)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(tensors: Iterable[tuple[str, torch.Tensor]], hf_config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) -> (GGUF name, tensor in llama.cpp's layout)."""
    from ..models.registry import decoder_config

    mt = check_family(hf_config)
    dc = decoder_config(hf_config)
    arch = GGUF_ARCH[mt]
    names = get_tensor_name_map(arch, dc.num_layers)
    gemma = mt.startswith("gemma")
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq") or name.startswith("score."):
            continue
        if name == "lm_head.weight" and dc.tie_word_embeddings:
            continue
        stem, dot, suffix = name.rpartition(".")
        gname = names.get_name(stem)
        if gname is None:
            raise ValueError(f"tensor {name} has no GGUF name for architecture {MODEL_ARCH_NAMES[arch]}")
        t = t.detach().to("cpu", torch.float32)
        if arch == MODEL_ARCH.LLAMA and stem.endswith("self_attn.q_proj"):
            t = permute_rotary(t, dc.num_heads)
        elif arch == MODEL_ARCH.LLAMA and stem.endswith("self_attn.k_proj"):
            t = permute_rotary(t, dc.num_kv_heads)
        if gemma and name.endswith("norm.weight"):
            t = t + 1.0
        yield f"{gname}.{suffix}", t
    if arch == MODEL_ARCH.LLAMA:
        factors = rope_factors(dc)
        if factors is not None:
            yield "rope_freqs.weight", factors


def rope_factors(dc: Any) -> torch.Tensor | None:
    """llama3-style rope scaling as llama.cpp stores it: per-frequency divisors (rope_freqs)."""
    from ..kernels.rope import rope_inv_freq

    kind = (dc.rope or {}).get("rope_type", (dc.rope or {}).get("type"))
    if kind != "llama3":
        return None
    scaled, _ = rope_inv_freq(dc.head_dim, dc.rope, dc.max_position_embeddings)
    plain, _ = rope_inv_freq(dc.head_dim, {"rope_theta": dc.rope.get("rope_theta", 10000.0)}, dc.max_position_embeddings)
    return (plain / scaled).float()


def _encode(t: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """One tensor as the array GGUF stores for `qtype` (tensor_type's pick)."""
    if qtype == GGMLQuantizationType.F32:
        return t.numpy().astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return t.numpy().astype(np.float16)
    if qtype in _KQUANTS:
        return quantize_k(t.reshape(-1, t.shape[-1]), qtype.name.lower())
    return quantize(t.numpy(), qtype)


def _hparams(w: GGUFWriter, hf_config: dict[str, Any]) -> None:
    from ..models.registry import decoder_config

    mt = hf_config["model_type"]
    dc = decoder_config(hf_config)
    w.add_context_length(int(dc.max_position_embeddings))
    w.add_embedding_length(dc.hidden_size)
    w.add_block_count(dc.num_layers)
    w.add_feed_forward_length(dc.intermediate_size)
    w.add_head_count(dc.num_heads)
    w.add_head_count_kv(dc.num_kv_heads)
    w.add_layer_norm_rms_eps(float(dc.rms_norm_eps))
    w.add_rope_freq_base(float(dc.rope.get("rope_theta", 10000.0)))
    w.add_vocab_size(dc.vocab_size)
    if GGUF_ARCH[mt] == MODEL_ARCH.LLAMA:
        w.add_rope_dimension_count(dc.head_dim)
    if mt.startswith("gemma") or dc.head_dim * dc.num_heads != dc.hidden_size:
        w.add_key_length(dc.head_dim)
        w.add_value_length(dc.head_dim)
    kind = dc.rope.get("rope_type", dc.rope.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(dc.rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(dc.rope["factor"]))
        orig = dc.rope.get("original_max_position_embeddings")
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
    if mt == "gemma2":
        w.add_attn_logit_softcapping(float(dc.attn_softcap or 50.0))
        w.add_final_logit_softcapping(float(dc.final_softcap or 30.0))
        w.add_sliding_window(int(dc.sliding_window or 4096))
    if mt == "gemma3_text":
        if dc.final_softcap:
            w.add_final_logit_softcapping(float(dc.final_softcap))
        if dc.sliding_window:
            w.add_sliding_window(int(dc.sliding_window))


def write_gguf(tensors: Iterable[tuple[str, torch.Tensor]], hf_config: dict[str, Any], tokenizer: Any, out: str | Path,
               quant: str = "f16", name: str | None = None) -> Path:
    """Write GGUF from HF-named tensors (already merged), the HF config dict and the tokenizer.

    Written to a temp file beside `out`, then renamed. Returns `out`.
    """
    from ..models.registry import decoder_config

    quant = check_quant(quant)
    mt = check_family(hf_config)
    qtype, ftype = QUANT_TYPES[quant]
    dc = decoder_config(hf_config)
    arch = GGUF_ARCH[mt]
    with atomic_output(out) as tmp:
        w = GGUFWriter(str(tmp), MODEL_ARCH_NAMES[arch], use_temp_file=True)
        w.add_type("model")
        w.add_name(name or "model")
        w.add_file_type(int(ftype))
        if qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_quantization_version(GGML_QUANT_VERSION)
        _hparams(w, hf_config)
        build_vocab(tokenizer, dc.vocab_size, hf_config).write(w)
        # k-quants of an 8B model take minutes on a few CPU cores: a bar over the decoder blocks reached
        # (in any order), whose percentage the Studio's export job shows
        bar = tqdm(total=dc.num_layers, desc=f"GGUF {quant}", unit=" blocks", dynamic_ncols=True, leave=False)
        blocks: set[str] = set()
        for gname, t in gguf_tensors(tensors, hf_config):
            ttype = tensor_type(gname, quant, dc.num_layers, tuple(t.shape), dc.tie_word_embeddings)
            arr = _encode(t, ttype)
            w.add_tensor(gname, arr, raw_dtype=ttype if ttype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else None)
            if gname.startswith("blk."):
                blocks.add(gname.split(".")[1])
                bar.update(len(blocks) - bar.n)
        bar.close()
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)


def folder_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors of a safetensors model folder, one at a time (never the whole model in memory)."""
    from safetensors import safe_open

    from ..models.loading import weight_files

    for f in weight_files(folder):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                yield k, fh.get_tensor(k)


def gguf_from_folder(folder: str | Path, out: str | Path, quant: str = "f16", name: str | None = None) -> Path:
    """An HF model folder (of a supported family) -> GGUF file."""
    from ..models.loading import load_tokenizer

    folder = Path(folder)
    hf_config = json.loads((folder / "config.json").read_text())
    tok = load_tokenizer(folder)
    return write_gguf(folder_tensors(folder), hf_config, tok, out, quant, name or folder.name)


def model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors of a loaded own-decoder model with LoRA folded in layer by layer (a 4-bit base is
    dequantized first), without a merged copy of the whole model."""
    from ..adapters.lora import LoRALinear

    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for n, m in lora.items():
        yield f"{n}.weight", (m.merged_weight() if m.enabled else m.base_weight())
        if m.bias is not None:
            yield f"{n}.bias", m.bias
    for k, v in model.state_dict().items():
        if not any(k.startswith(p + ".") for p in lora):
            yield k, v
