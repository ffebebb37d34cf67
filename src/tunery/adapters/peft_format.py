"""Save and load adapters in PEFT's on-disk format, so they load in peft, vLLM and transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..atomic import atomic_output
from .lora import LoRALinear, lora_layers

PREFIX = "base_model.model."


def adapter_state(model: nn.Module, modules_to_save: list[str] | None = None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, m in lora_layers(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
        if m.use_dora:
            state[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude.detach().contiguous()
    for target in modules_to_save or []:
        for mname, module in model.named_modules():
            if mname == target or mname.endswith("." + target):
                for pname, p in module.named_parameters(recurse=False):
                    state[f"{PREFIX}{mname}.{pname}"] = p.detach().contiguous().clone()
    return state


def adapter_config(model: nn.Module, base_model_path: str, modules_to_save: list[str] | None = None) -> dict[str, Any]:
    layers = lora_layers(model)
    any_layer = next(iter(layers.values()))
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    rslora = abs(any_layer.scale - any_layer.alpha / any_layer.r) > 1e-9
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": any_layer.r,
        "lora_alpha": any_layer.alpha,
        "lora_dropout": any_layer.dropout_p,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": rslora,
        "use_dora": bool(any_layer.use_dora),
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "library_name": "tunery",
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_path: str, modules_to_save: list[str] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors atomically."""
    out = Path(out_dir)
    state = {k: v.float() if v.dtype == torch.float32 else v for k, v in adapter_state(model, modules_to_save).items()}
    with atomic_output(out, folder=True) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(model, base_model_path, modules_to_save),
                                                            indent=2))
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict[str, Any]:
    """Inject LoRA per adapter_config.json, then load the weights. Returns the adapter config."""
    from .lora import inject_lora, untie_if_shared

    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: no adapter_config.json (not a PEFT adapter folder)")
    cfg = json.loads(cfg_path.read_text())
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not lora_layers(model):
        inject_lora(model, list(targets), int(cfg["r"]), float(cfg["lora_alpha"]), 0.0, bool(cfg.get("use_rslora")),
                    cfg.get("modules_to_save"), use_dora=bool(cfg.get("use_dora")))
    state = load_file(str(d / "adapter_model.safetensors"))
    layers = lora_layers(model)
    for name in cfg.get("modules_to_save") or []:
        untie_if_shared(model, name)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, value in state.items():
        name = key.removeprefix(PREFIX)
        for tag in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_magnitude_vector.weight"):
            if name.endswith(tag):
                mod = layers[name[: -len(tag)].replace(".default", "")]
                if "magnitude" in tag and not mod.use_dora:
                    raise KeyError(f"{d}: {key} is a DoRA magnitude, but adapter_config.json has no use_dora: true")
                target: torch.Tensor = (mod.lora_A if "lora_A" in tag else mod.lora_B if "lora_B" in tag
                                        else mod.lora_magnitude)
                break
        else:
            name = name.replace(".modules_to_save.default", "").replace(".modules_to_save", "")
            if name not in params:
                raise KeyError(f"{d}: adapter tensor {key} matches nothing in the model")
            target = params[name]
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
    return cfg


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into a plain nn.Linear (in place) and return the model."""
    for name, m in list(lora_layers(model).items()):
        parent_name, leaf = name.rsplit(".", 1)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        w = m.merged_weight()
        lin = lin.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        setattr(model.get_submodule(parent_name), leaf, lin)
    return model


__all__ = ["LoRALinear", "adapter_config", "adapter_state", "load_adapter", "merge_lora", "save_adapter"]
