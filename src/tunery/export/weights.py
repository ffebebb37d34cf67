"""Write a model as an HF folder: sharded safetensors (+ index), config.json, generation_config.json, tokenizer
and chat template. transformers, vLLM and peft load the result directly.

Written into a temp folder beside the target and renamed into place, so a crash never leaves half a
model where a model is expected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..atomic import atomic_output

# model_type -> architectures entry, for configs that lack it (the GGUF-converted default has none)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_size(size: int | str) -> int:
    """5GB, 500MB, 2GiB or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max shard size {size!r}: give bytes or a size like 5GB / 500MB / 2GiB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
    return int(num * (1024 if binary else 1000) ** power)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, on CPU: LoRA layers folded in (a 4-bit base dequantized first),
    the tied lm_head dropped, heads that are not part of the LM (`score.`) left out."""
    from ..adapters.lora import LoRALinear

    base = model.hf if hasattr(model, "hf") else model
    lora = {name: mod for name, mod in base.named_modules() if isinstance(mod, LoRALinear)}
    state: dict[str, torch.Tensor] = {}
    for name, mod in lora.items():
        state[f"{name}.weight"] = mod.merged_weight() if mod.enabled else mod.base_weight()
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.detach()
    for k, v in base.state_dict().items():
        if any(k.startswith(p + ".") for p in lora) or k.startswith("score."):
            continue
        state[k] = v
    if _tied(model):
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _tied(model: nn.Module) -> bool:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
        return bool(cfg.tie_word_embeddings)
    hf = getattr(model, "hf", None)
    if hf is not None:
        out, inp = hf.get_output_embeddings(), hf.get_input_embeddings()
        return out is not None and inp is not None and out.weight is inp.weight
    return False


def save_sharded(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | str = 5 * 10**9) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json (HF's layout)."""
    limit = parse_size(max_shard_bytes)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in state:
        n = state[k].numel() * state[k].element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def hf_config_dict(base_path: str | Path | None, model: nn.Module, dtype: torch.dtype | None) -> dict[str, Any]:
    """The base's config.json with dtype, architectures, vocab size and tying brought up to date."""
    cfg: dict[str, Any] = {}
    if base_path is not None and (Path(base_path) / "config.json").is_file():
        cfg = json.loads((Path(base_path) / "config.json").read_text())
    hf = getattr(model, "hf", None)
    if hf is not None and not cfg:
        cfg = hf.config.to_dict()
    own_cfg = getattr(model, "cfg", None)
    if own_cfg is not None and hasattr(own_cfg, "tie_word_embeddings"):
        cfg["tie_word_embeddings"] = bool(own_cfg.tie_word_embeddings)  # lm_head may have been untied
        cfg["vocab_size"] = int(model.model.embed_tokens.weight.shape[0])
    if dtype is not None:
        cfg["dtype"] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        cfg.pop("torch_dtype", None)
    mt = cfg.get("model_type")
    if not cfg.get("architectures") and mt in ARCHITECTURES:
        cfg["architectures"] = [ARCHITECTURES[mt]]
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(k, None)
    return cfg


def generation_config_dict(base_path: str | Path | None, cfg: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
    """The base's generation_config.json (or one from the config's token ids); eos lists the end-of-turn
    tokens too, so transformers' generate stops where Tunery's does."""
    gen: dict[str, Any] = {}
    if base_path is not None and (Path(base_path) / "generation_config.json").is_file():
        gen = json.loads((Path(base_path) / "generation_config.json").read_text())
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(k) is None and cfg.get(k) is not None:
            gen[k] = cfg[k]
    if tokenizer is not None:
        from ..generate.stops import stop_token_ids

        stops = stop_token_ids(tokenizer, gen)
        if stops:
            gen["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    return gen


def save_model_folder(model: nn.Module, base_path: str | Path | None, tokenizer: Any, out: str | Path,
                      dtype: torch.dtype | None = None, max_shard_bytes: int | str = 5 * 10**9) -> Path:
    """Write `model` (own decoder or transformers fallback; LoRA layers are folded in) as an HF folder."""
    out = Path(out)
    with atomic_output(out, folder=True) as tmp:
        state = hf_state_dict(model)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_sharded(state, tmp, max_shard_bytes)
        floats = [v for v in state.values() if v.is_floating_point()]
        cfg = hf_config_dict(base_path, model, dtype or (floats[0].dtype if floats else None))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = generation_config_dict(base_path, cfg, tokenizer)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out
