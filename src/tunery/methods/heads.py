"""The small trainable heads of the reward models, registered on the decoder as `model.score`.

The name and shapes are those of transformers' LlamaForSequenceClassification (`score`: Linear(hidden, 1, bias
False)) and LlamaForTokenClassification (`score`: Linear(hidden, num_labels)), so a saved `score.weight` loads there.
Attach the head before adapters and sharding (`prepare_model`), so FSDP shards it with the root module and
`inject_lora(..., modules_to_save=["score"])` keeps it trainable and `save_adapter` writes it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def hidden_size_of(model: nn.Module) -> int:
    return int(model.head_weight.shape[1])


def attach_score_head(model: nn.Module, num_labels: int, bias: bool, seed: int = 0, std: float = 0.02) -> nn.Linear:
    """`model.score` (created once, normal(0, std) weights, zero bias, seeded so runs repeat); trainable.

    The head is float32 whatever the base dtype, like the adapter weights the loop keeps in fp32.
    """
    head = getattr(model, "score", None)
    if head is None:
        w = model.head_weight
        head = nn.Linear(hidden_size_of(model), num_labels, bias=bias, device=w.device, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
            if head.bias is not None:
                head.bias.zero_()
        model.score = head
    elif head.out_features != num_labels:
        raise ValueError(f"model.score has {head.out_features} outputs, this method needs {num_labels}")
    for p in head.parameters():
        p.requires_grad_(True)
    return head


def apply_head(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """head(hidden) in float32, also under autocast (scores are few; precision matters more than the cast)."""
    bias = head.bias.float() if head.bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)


def load_score_head(model: nn.Module, path: str) -> nn.Linear:
    """Attach the head saved with a reward-model run (`score_head.safetensors`, a file or the folder holding it)."""
    from pathlib import Path

    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "score_head.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no score head (reward-model runs write score_head.safetensors beside the "
                                "adapter or model weights)")
    state = {k.removeprefix("score."): v for k, v in load_file(str(p)).items()}
    head = attach_score_head(model, int(state["weight"].shape[0]), bias="bias" in state)
    with torch.no_grad():
        head.weight.copy_(state["weight"].to(head.weight))
        if head.bias is not None:
            head.bias.copy_(state["bias"].to(head.bias))
    return head
