"""Architecture registry: which HF model types the own decoder runs, and their switches."""

from __future__ import annotations

import math
from typing import Any

from .decoder import DecoderConfig

# model_type -> family name. Anything else trains through transformers, unfused.
OWN_FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)


def _rope_params(hf: Any) -> dict[str, Any]:
    params = _get(hf, "rope_parameters") or _get(hf, "rope_scaling") or {}
    params = dict(params)
    if "full_attention" in params and isinstance(params["full_attention"], dict):  # per-layer-type (gemma3)
        params = dict(params["full_attention"])
    if "rope_theta" not in params:
        params["rope_theta"] = _get(hf, "rope_theta", 10000.0)
    return params


def supports(hf_config: Any) -> bool:
    return _get(hf_config, "model_type") in OWN_FAMILIES


def decoder_config(hf: Any) -> DecoderConfig:
    """Translate a transformers config into the decoder's switches."""
    mt = _get(hf, "model_type")
    family = OWN_FAMILIES[mt]
    heads = _get(hf, "num_attention_heads")
    hidden = _get(hf, "hidden_size")
    head_dim = _get(hf, "head_dim") or hidden // heads
    kw: dict[str, Any] = dict(
        family=family,
        vocab_size=_get(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_get(hf, "intermediate_size"),
        num_layers=_get(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_get(hf, "num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=_get(hf, "rms_norm_eps", 1e-6),
        rope=_rope_params(hf),
        max_position_embeddings=_get(hf, "max_position_embeddings", 8192),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        attention_bias=bool(_get(hf, "attention_bias", False)),
        mlp_bias=bool(_get(hf, "mlp_bias", False)),
        bos_token_id=_get(hf, "bos_token_id"),
        eos_token_id=_get(hf, "eos_token_id"),
        pad_token_id=_get(hf, "pad_token_id"),
    )
    act = _get(hf, "hidden_activation") or _get(hf, "hidden_act", "silu")
    kw["hidden_act"] = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "gelu_new": "gelu_tanh"}.get(act, act)
    if family == "qwen2":
        kw["attention_bias"] = True
        if _get(hf, "use_sliding_window", False):
            kw["sliding_window"] = _get(hf, "sliding_window")
    if family == "mistral":
        kw["sliding_window"] = _get(hf, "sliding_window")
    if family == "qwen3":
        kw["qk_norm"] = True
        if _get(hf, "use_sliding_window", False):
            kw["sliding_window"] = _get(hf, "sliding_window")
    if family.startswith("gemma"):
        kw["norm_offset"] = 1.0
        kw["embed_scale"] = math.sqrt(hidden)
        kw["hidden_act"] = "gelu_tanh" if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_tanh") else kw["hidden_act"]
    if family in ("gemma2", "gemma3"):
        kw["sandwich_norm"] = True
        kw["query_scale"] = _get(hf, "query_pre_attn_scalar", head_dim) ** -0.5
        kw["attn_softcap"] = _get(hf, "attn_logit_softcapping")
        kw["final_softcap"] = _get(hf, "final_logit_softcapping")
        kw["sliding_window"] = _get(hf, "sliding_window")
        lt = _get(hf, "layer_types")
        if lt is None:
            # transformers' defaults: Gemma 2 alternates (sliding first), Gemma 3 has 5 sliding then 1 full
            pattern = _get(hf, "sliding_window_pattern", 6 if family == "gemma3" else 2)
            lt = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(kw["num_layers"])]
        kw["layer_types"] = list(lt)
    if family == "gemma3":
        kw["qk_norm"] = True
        rp = _get(hf, "rope_parameters") or {}
        if isinstance(rp, dict) and "sliding_attention" in rp:
            kw["local_rope"] = dict(rp["sliding_attention"])
        else:
            kw["local_rope"] = {"rope_type": "default", "rope_theta": _get(hf, "rope_local_base_freq", 10000.0)}
    return DecoderConfig(**kw)
