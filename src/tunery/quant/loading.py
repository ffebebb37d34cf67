"""Streaming construction of a quantized model: the full 16-bit model never exists on the device.

The model is built on the meta device by the caller (models/ cannot import quant/, see DESIGN.md);
`materialize` then walks a stream of (HF name, tensor) pairs: each linear weight inside a decoder
block is moved to the device, cast to the compute dtype, quantized to NF4 and dropped, one at a time;
every other tensor (embeddings, norms, LM head, biases) is placed as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from .nf4 import NF4Linear, NF4Weight, _is_skipped


def _quant_targets(model: nn.Module, skip: tuple[str, ...]) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{n}." and not _is_skipped(n, skip)]


def _place(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(name)


@torch.no_grad()
def materialize(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device | str,
                dtype: torch.dtype, double_quant: bool = False, skip: tuple[str, ...] = ("lm_head", "embed_tokens"),
                quantize: bool = True, keep_float32: tuple[str, ...] = ()) -> list[str]:
    """Fill a meta-device `model` from `tensors` (HF names), quantizing decoder-block linear weights.

    Returns the names still on the meta device afterwards: non-persistent buffers computed in
    `__init__` (rope frequencies) that the caller recomputes. Raises on unknown or missing weights.
    """
    device = torch.device(device)
    targets = set(_quant_targets(model, skip)) if quantize else set()
    for name in targets:
        lin = model.get_submodule(name)
        shell = NF4Linear(NF4Weight(lin.weight.shape, dtype, double_quant, device="meta"), lin.bias)
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, shell)
    tied = bool(getattr(getattr(model, "cfg", None), "tie_word_embeddings", False))
    seen, unexpected = set(), []
    for raw_name, t in tensors:
        name = raw_name.removeprefix("module.")
        if "rotary_emb" in name or (tied and name == "lm_head.weight"):
            continue
        mod_name, leaf = name.rsplit(".", 1)
        if mod_name in targets and leaf == "weight":
            w = t.to(device=device, dtype=dtype)
            q = NF4Weight.from_tensor(w, double_quant, dtype)
            del w
            model.get_submodule(mod_name).weight = q
            seen.add(name)
            continue
        keep = t.dtype if (not t.dtype.is_floating_point or any(k in name for k in keep_float32)) else dtype
        try:
            _place(model, name, t.to(device=device, dtype=keep))
        except (KeyError, AttributeError):
            unexpected.append(name)
            continue
        seen.add(name)
    if unexpected:
        raise ValueError(f"weights do not match the model: unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [f"{t}.weight" for t in targets if f"{t}.weight" not in seen]
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {missing[:5]}")
    return [n for n, b in model.named_buffers() if b.device.type == "meta"]


def safetensors_stream(files: Iterable[str | Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of these safetensors files, one at a time (memory-mapped reads)."""
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                yield key, sf.get_tensor(key)


def load_quantized(model: nn.Module, files: Iterable[str | Path], device: torch.device | str, dtype: torch.dtype,
                   double_quant: bool = False, skip: tuple[str, ...] = ("lm_head", "embed_tokens")) -> list[str]:
    """Load a checkpoint's safetensors `files` (models.loading.weight_files(folder) gives an HF folder's)
    into a meta-device `model`, NF4 for decoder-block linears.

    Peak device memory: the quantized model plus one 16-bit tensor and its quantization scratch.
    Returns the still-meta buffer names (see `materialize`).
    """
    if isinstance(files, (str, Path)):  # a folder or one file: a str would stream its characters
        raise TypeError(f"load_quantized takes a list of safetensors files, not {str(files)!r}: pass "
                        "tunery.models.loading.weight_files(folder)")
    return materialize(model, safetensors_stream(files), device, dtype, double_quant, skip)


def random_stream(specs: list[tuple[str, torch.Size]], device: torch.device | str, std: float = 0.02, seed: int = 0,
                  norm_value: float = 1.0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights for (name, shape) pairs, generated on `device` one at a time (benchmarks)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in specs:
        if name.endswith("norm.weight"):
            yield name, torch.full(shape, norm_value, device=device)
        elif name.endswith("bias"):
            yield name, torch.zeros(shape, device=device)
        else:
            yield name, torch.randn(shape, device=device, generator=gen, dtype=torch.bfloat16) * std


def init_quantized_random(model: nn.Module, device: torch.device | str, dtype: torch.dtype,
                          double_quant: bool = False, quantize: bool = True, std: float = 0.02, seed: int = 0,
                          skip: tuple[str, ...] = ("lm_head", "embed_tokens")) -> list[str]:
    """Like `load_quantized` with random weights instead of a checkpoint (the memory benchmark)."""
    offset = float(getattr(getattr(model, "cfg", None), "norm_offset", 0.0) or 0.0)
    specs = [(n, p.shape) for n, p in model.named_parameters()]  # before materialize swaps the linears
    stream = random_stream(specs, device, std, seed, norm_value=0.0 if offset else 1.0)
    return materialize(model, stream, device, dtype, double_quant, skip, quantize)
