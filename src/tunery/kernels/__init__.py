"""Fused ops. Each module: a Triton kernel, a plain-PyTorch reference, and the function that picks one.

Only torch and triton may be imported here (DESIGN.md).
"""

from __future__ import annotations

import os

import torch


def triton_available() -> bool:
    """Triton runs on a CUDA GPU, or on CPU under TRITON_INTERPRET=1 (tests)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton_for(x: torch.Tensor, enabled: bool = True) -> bool:
    """Fused path for CUDA tensors; on CPU only when TRITON_INTERPRET=1 asks for it."""
    if not enabled or not triton_available():
        return False
    if x.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("TUNERY_TRITON_ON_CPU") == "1"
