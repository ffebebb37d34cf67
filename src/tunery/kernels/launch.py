"""Triton kernel launches with less Python per call.

Why: `kernel[grid](*args, **meta)` costs ~40 us of CPU per call in Triton 3.6 (binding the
arguments, building the specialisation key, looking the binary up), against ~7 us for a torch op.
A QLoRA step of an 8B model launches ~800 small Triton kernels (norms, RoPE, activations, NF4
dequantisation), and its forward pass waits on the CPU: those 40 us are GPU idle time.

`launch(kernel, grid, *args, **meta)` makes the first call for a given specialisation the normal
way, keeps the compiled kernel Triton returns, and from then on launches that binary directly
through its own launcher (`CompiledKernel[grid](*all_args)`). The key used here is at least as fine
as Triton's own (argument dtypes, 16-byte alignment of pointers, integers equal to 1 / divisible
by 16 / fitting 32 bits, constexpr and option values), so the binary is always the one Triton would
pick. When the installed Triton does not offer that launcher, or it rejects the call, the kernel
falls back to the normal path for the rest of the process. `TUNERY_FAST_LAUNCH=0` turns it off.
Only for kernels that are passed every parameter (positionally, then the constexprs by name).
"""

from __future__ import annotations

import os
from typing import Any

import torch

_ENABLED = os.environ.get("TUNERY_FAST_LAUNCH", "1") != "0"
_CACHE: dict[tuple, Any] = {}
_OFF = object()  # this specialisation takes the normal path


def _arg_key(a: Any) -> tuple:
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return ("i", a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
    if isinstance(a, float):
        return ("f",)
    return ("o", a)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    first = args[0]
    if not (_ENABLED and isinstance(first, torch.Tensor) and first.is_cuda):
        kernel[grid](*args, **meta)
        return
    key = (kernel, first.device.index, len(grid), tuple(_arg_key(a) for a in args), tuple(meta.items()))
    hit = _CACHE.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **meta)
        names = getattr(kernel, "arg_names", None)
        rest = list(names[len(args):]) if names is not None and len(names) >= len(args) else None
        if compiled is None or not hasattr(compiled, "__getitem__") or rest is None or any(n not in meta for n in rest):
            _CACHE[key] = _OFF
        else:
            _CACHE[key] = (compiled, tuple(meta[n] for n in rest))
        return
    if hit is _OFF:
        kernel[grid](*args, **meta)
        return
    compiled, tail = hit
    try:
        compiled[grid](*args, *tail, stream=torch.cuda.current_stream(first.device).cuda_stream)
    except TypeError:  # a launcher with another calling convention: never again for this key
        _CACHE[key] = _OFF
        kernel[grid](*args, **meta)


def fast_launch_stats() -> dict[str, int]:
    """Specialisations seen so far: launched directly ("fast") or through Triton ("normal")."""
    fast = sum(1 for v in _CACHE.values() if v is not _OFF)
    return {"fast": fast, "normal": len(_CACHE) - fast}


__all__ = ["fast_launch_stats", "launch"]
