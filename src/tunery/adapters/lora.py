"""LoRA layers and injection by module name; the base weight keeps its HF name (`q_proj.weight`)."""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = x W^T + b + scale * dropout(x) A^T B^T.

    `weight` is the frozen base (a Parameter, or a quantized storage object with `.dequantize()` for
    QLoRA); `lora_A` [r, in] and `lora_B` [out, r] train. `enabled=False` gives the base model back
    (the DPO/KTO reference without a second copy).

    `use_dora` (DoRA, peft's `use_dora`): a trained magnitude per output row, `lora_magnitude` [out],
    rescales the adapted weight: y = m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b, the norm held
    constant in backward (the paper's section 4.3, as peft does). It starts at ||W||_row, so an
    untrained layer is the base. These layers take the plain path (no fused kernels).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 use_dora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev = base.weight.device if base.weight.device.type != "meta" else None
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha = r, alpha
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout_p = dropout
        self.enabled = True
        self.fused = False
        self.use_dora = use_dora
        if use_dora:
            self.lora_magnitude = nn.Parameter(torch.ones(self.out_features, device=dev, dtype=dtype))
            if base.weight.device.type != "meta":
                self.reset_magnitude()

    def _adapted_weight(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """W + s B A in fp32 (DoRA's norm and merge); `w`: the base weight when the caller has it."""
        w = self.base_weight() if w is None else w
        return w.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: m = ||W + s B A||_row, so the layer computes what it does without DoRA (at injection, and
        again once the base is quantized: the norm must be the quantized weight's)."""
        self.lora_magnitude.copy_(torch.linalg.norm(self._adapted_weight(), dim=1).to(self.lora_magnitude.dtype))

    def base_weight(self) -> torch.Tensor:
        w = self.weight
        return w.dequantize() if hasattr(w, "dequantize") and not isinstance(w, torch.Tensor) else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_dora and self.enabled:
            return self._dora(x)
        w = self.weight
        # quantized storage (quant/) runs its own frozen linear that never keeps the dequantized W
        out = F.linear(x, w, self.bias) if isinstance(w, torch.Tensor) else w.linear(x, self.bias)
        if not self.enabled:
            return out
        h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p else x
        a, b = self.lora_A, self.lora_B
        if h.dtype in (torch.bfloat16, torch.float16) and a.dtype == torch.float32:
            # half activations, fp32 adapter weights: compute in the activation dtype as autocast does;
            # casting x up instead would keep an fp32 copy of every layer input for backward
            a, b = a.to(h.dtype), b.to(h.dtype)
        else:
            h = h.to(a.dtype)
        return out + F.linear(F.linear(h, a), b).to(out.dtype) * self.scale

    def _dora(self, x: torch.Tensor) -> torch.Tensor:
        """peft's DoRA forward: base + (m / n - 1) * base' + m / n * s * lora, base' the dropped input's.

        A quantized base is dequantized here only for the norm; its products go through the storage's own
        frozen linear, so autograd never keeps (or, under activation offload, ships to the host) a
        dequantized copy of W per layer."""
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        with torch.no_grad():  # ||W + s B A||_row: a constant in backward
            w = self.base_weight().to(x.dtype)
            norm = torch.linalg.norm(w + self.scale * (b @ a), dim=1)
        if isinstance(self.weight, torch.Tensor):
            def base_linear(t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
                return F.linear(t, w, bias)
        else:
            del w  # the dequantized copy dies here
            base_linear = self.weight.linear
        out = base_linear(x, self.bias)
        # in the activations' dtype: under autocast the norm comes out fp32, and an fp32 scale would make
        # the layer's output, everything saved after it and the residual stream fp32 (twice the memory;
        # peft casts its result back to the base output's dtype for the same reason)
        mag = (self.lora_magnitude / norm).to(out.dtype).view(*([1] * (x.dim() - 1)), -1)
        dropped = self.dropout_p and self.training
        h = F.dropout(x, self.dropout_p, True) if dropped else x
        base = base_linear(h) if dropped else (out - self.bias if self.bias is not None else out)
        return out + (mag - 1) * base + mag * F.linear(F.linear(h, a), b) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.base_weight()
        merged = self._adapted_weight(w)  # one dequantization of a 4-bit base, not two
        if self.use_dora:
            merged = (self.lora_magnitude.float() / torch.linalg.norm(merged, dim=1))[:, None] * merged
        return merged.to(w.dtype if w.dtype.is_floating_point else torch.float32)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


def target_names(target_modules: list[str] | None, target_linear: bool) -> list[str]:
    if target_linear or not target_modules:
        return list(LINEAR_NAMES)
    return list(target_modules)


def _matches(name: str, targets: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    for t in targets:
        if leaf == t or name.endswith("." + t) or name == t:
            return True
        if any(c in t for c in "*[(\\") and re.fullmatch(t, name):
            return True
    return False


def inject_lora(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float = 0.0,
                rslora: bool = False, modules_to_save: list[str] | None = None, use_dora: bool = False) -> list[str]:
    """Freeze the model, swap matching nn.Linear layers inside decoder blocks for LoRALinear (DoRA with
    `use_dora`).

    Returns the adapted module paths. `modules_to_save` (e.g. lm_head) stay fully trainable.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = []
    for name, module in list(model.named_modules()):
        linear = isinstance(module, nn.Linear) or getattr(module, "is_quantized_linear", False)  # quant.NF4Linear
        if linear and ".layers." in f".{name}" and _matches(name, targets):
            parent_name, leaf = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, LoRALinear(module, r, alpha, dropout, rslora, use_dora))
            replaced.append(name)
    if not replaced:
        raise ValueError(f"lora_target_modules {targets} matched no linear layer of the model")
    for name in modules_to_save or []:
        untie_if_shared(model, name)
        found = False
        for mname, module in model.named_modules():
            if mname == name or mname.endswith("." + name):
                for p in module.parameters():
                    p.requires_grad_(True)
                found = True
        if not found:
            raise ValueError(f"lora_modules_to_save: no module named {name!r}")
    return replaced


def untie_if_shared(model: nn.Module, name: str) -> None:
    """A module trained fully (modules_to_save) gets its own copy when its weight is tied (lm_head <-> embeddings),
    as peft does, so training it never moves the other."""
    if name.rsplit(".", 1)[-1] != "lm_head" or not hasattr(model, "lm_head"):
        return
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else getattr(
        getattr(model, "model", None), "embed_tokens", None)
    if emb is not None and model.lm_head.weight is emb.weight:
        model.lm_head.weight = nn.Parameter(emb.weight.detach().clone())
        if hasattr(model, "cfg") and getattr(model.cfg, "tie_word_embeddings", False):
            model.cfg.tie_word_embeddings = False


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def reset_dora_magnitudes(model: nn.Module) -> int:
    """Every DoRA layer's magnitude set to its current ||W + s B A||_row (after quantizing the base).
    Returns how many layers."""
    layers = [m for m in lora_layers(model).values() if m.use_dora]
    for m in layers:
        m.reset_magnitude()
    return len(layers)


class adapters_disabled:
    """Context: run the base model (every LoRA layer off) — the reference for DPO/KTO/GRPO."""

    def __init__(self, model: nn.Module):
        self.layers = list(lora_layers(model).values())

    def __enter__(self):
        for m in self.layers:
            m.enabled = False
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.enabled = True
