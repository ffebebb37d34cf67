"""AdamW (fused on CUDA) with no weight decay on norms, biases and embeddings' LoRA-free params."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    params = trainable_parameters(model)
    if not params:
        raise ValueError("no trainable parameters: check adapter / lora_target_modules")
    decay = [p for n, p in params if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "norm" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    on_cuda = params[0][1].is_cuda
    kw: dict[str, Any] = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if on_cuda and cfg.optimizer in ("adamw", "adamw_torch_fused"):
        kw["fused"] = True
    else:
        kw["foreach"] = False  # the single-tensor path: bit-reproducible across resume on CPU
    return torch.optim.AdamW(groups, **kw)
