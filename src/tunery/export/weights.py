"""Write a model as an HF folder: sharded safetensors, config.json, tokenizer and chat template."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (tied lm_head dropped, LoRA/quant wrappers resolved)."""
    from ..adapters.lora import LoRALinear

    base = model.hf if hasattr(model, "hf") else model
    state: dict[str, torch.Tensor] = {}
    lora_prefixes = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoRALinear):
            lora_prefixes[name] = mod
    for name, mod in lora_prefixes.items():
        state[f"{name}.weight"] = mod.merged_weight() if mod.enabled else mod.base_weight()
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.detach()
    for k, v in base.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if owner in lora_prefixes or any(k.startswith(p + ".") for p in lora_prefixes):
            continue
        if k.startswith("score."):
            continue
        state[k] = v
    cfg = getattr(base, "cfg", None)
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_sharded(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        n = state[k].numel() * state[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_model_folder(model: nn.Module, base_path: Path, tokenizer: Any, out: Path, dtype: torch.dtype | None = None,
                      max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Atomic: written to a temp folder, then renamed over `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = hf_state_dict(model)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_sharded(state, tmp, max_shard_bytes)
        cfg = json.loads((Path(base_path) / "config.json").read_text())
        cfg.pop("quantization_config", None)
        own_cfg = getattr(model, "cfg", None)
        if own_cfg is not None and hasattr(own_cfg, "tie_word_embeddings"):
            cfg["tie_word_embeddings"] = bool(own_cfg.tie_word_embeddings)  # lm_head may have been untied
        some = next(iter(state.values()))
        cfg["dtype"] = str(some.dtype).removeprefix("torch.")
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = Path(base_path) / "generation_config.json"
        if gen.is_file():
            shutil.copy(gen, tmp / "generation_config.json")
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
