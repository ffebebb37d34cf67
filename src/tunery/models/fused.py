"""Switches for the fused-kernel paths, in one place for the training loop.

`set_fused(model, enabled)` is what the config key `kernels` maps to: it sets the own decoder's
blocks (fused norm/LoRA/RoPE/activation/varlen attention on CUDA) and the process-wide kernel switch
that the loss kernels (fused linear cross-entropy, token log-probs) read. `compile_blocks` is
`torch_compile: true`; `set_mlp_recompute` is selective activation checkpointing for the MLPs;
`set_attention` is `attn_implementation`.
"""

from __future__ import annotations

import torch.nn as nn

from ..kernels import set_kernels_enabled
from .decoder import compile_blocks, set_mlp_recompute
from .decoder import set_fused as _set_blocks_fused

__all__ = ["compile_blocks", "set_attention", "set_fused", "set_mlp_recompute"]

# attn_implementation -> the own decoder's varlen_attention backend (kernels/attention.py) and the
# transformers fallback's attn_implementation
_OWN = {"varlen": "flash", "flex": "flex", "sdpa": "sdpa", "eager": "sdpa"}
_HF = {"flex": "flex_attention", "sdpa": "sdpa", "eager": "eager"}


def set_attention(model: nn.Module, impl: str) -> None:
    """`attn_implementation` other than auto: every attention layer uses that backend. For Tunery's
    decoder: varlen = FlashAttention-2 varlen kernels (CUDA), flex = FlexAttention, sdpa and eager =
    PyTorch SDPA per document (its math path on CPU). The transformers fallback gets its own name for it."""
    if impl == "auto":
        return
    from .decoder import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for m in layers:
        m.attn_backend = _OWN[impl]
    hf = getattr(model, "hf", None)
    if not layers and hf is not None:
        if impl not in _HF:
            raise ValueError(f"attn_implementation: {impl} needs Tunery's own decoder, and this model runs on the "
                             f"transformers fallback; use auto, {', '.join(sorted(_HF))}")
        hf.set_attn_implementation(_HF[impl])


def set_fused(model: nn.Module, enabled: bool) -> None:
    """Fused kernels on (used for CUDA tensors) or off (plain PyTorch everywhere, losses included)."""
    set_kernels_enabled(enabled)
    _set_blocks_fused(model, enabled)
