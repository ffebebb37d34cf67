"""Switches for the fused-kernel paths, in one place for the training loop.

`set_fused(model, enabled)` is what the config key `kernels` maps to: it sets the own decoder's
blocks (fused norm/LoRA/RoPE/activation/varlen attention on CUDA) and the process-wide kernel switch
that the loss kernels (fused linear cross-entropy, token log-probs) read. `compile_blocks` is
`torch_compile: true`; `set_mlp_recompute` is selective activation checkpointing for the MLPs.
"""

from __future__ import annotations

import torch.nn as nn

from ..kernels import set_kernels_enabled
from .decoder import compile_blocks, set_mlp_recompute
from .decoder import set_fused as _set_blocks_fused

__all__ = ["compile_blocks", "set_fused", "set_mlp_recompute"]


def set_fused(model: nn.Module, enabled: bool) -> None:
    """Fused kernels on (used for CUDA tensors) or off (plain PyTorch everywhere, losses included)."""
    set_kernels_enabled(enabled)
    _set_blocks_fused(model, enabled)
