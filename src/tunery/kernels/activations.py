"""Gated MLP activations: SwiGLU (Llama, Qwen, Mistral) and GeGLU (Gemma, tanh or erf)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


def gated_act(gate: torch.Tensor, up: torch.Tensor, kind: str, fused: bool = False) -> torch.Tensor:
    """kind: silu | gelu_tanh | gelu."""
    if kind == "silu":
        return swiglu_reference(gate, up)
    if kind == "gelu_tanh":
        return geglu_reference(gate, up, "tanh")
    if kind == "gelu":
        return geglu_reference(gate, up, "none")
    raise ValueError(f"unsupported activation {kind!r}")
