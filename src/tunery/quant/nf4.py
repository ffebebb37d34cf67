"""NF4 (4-bit NormalFloat) storage of frozen base weights, as in QLoRA (Dettmers et al., 2023).

Layout of one quantized weight of `numel` elements (row-major flattening of the [out, in] matrix,
zero-padded to a multiple of the block size 64):

  packed   uint8 [padded / 2]   two 4-bit codes per byte: element 2i in the HIGH nibble, 2i+1 in
                                the low nibble (the order bitsandbytes uses)
  absmax   float32 [padded / 64]  the absolute maximum of each block of 64 elements
           -- or, with double quantization (bnb_4bit_use_double_quant) --
  absmax   uint8 [padded / 64]    the absmax minus its mean, quantized per block of 256 scales with
                                  the signed 8-bit dynamic code (DYNAMIC_CODE, 256 values)
  absmax2  float32 [ceil(nblocks / 256)]  the absolute maximum of each block of 256 scales
  absmax_offset float32 [1]       the mean that was subtracted

Dequantization: w[j] = NF4_CODE[code(j)] * scale(j // 64), with
scale(b) = absmax[b]  or  DYNAMIC_CODE[absmax[b]] * absmax2[b // 256] + absmax_offset.

A block's codes are the nearest of the 16 NF4 values to w / absmax. Storage is 4 bits per weight
plus 32 / 64 = 0.5 bit (single) or 8 / 64 + 32 / (64 * 256) ~= 0.127 bit (double quantization).

The quantized linear never keeps a dequantized weight alive between forward and backward: the
autograd function dequantizes in forward, saves nothing, and dequantizes again for grad_input.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK = 64          # elements per absmax block
NESTED_BLOCK = 256  # absmax values per block of the double quantization

# The 16 NF4 values (QLoRA paper, appendix E): quantiles of N(0, 1) normalised to [-1, 1], with an
# exact zero. Written out (float32) rather than computed so that the format never drifts.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def normal_float_code(offset: float = 0.9677083) -> torch.Tensor:
    """Build the NF4 values from normal quantiles (8 positive, 7 negative, and zero), normalised.

    Only used to check NF4_CODE_VALUES; `offset` is the quantile the paper uses for the extremes.
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic-exponent code (Dettmers 2016) used for the nested absmax.

    For exponent e = 0..6 there are 2**e evenly spaced fractions in (0.1, 1], scaled by 10**(e-6),
    with both signs; plus 0 and 1: 2 * 127 + 2 = 256 sorted values in [-1, 1].
    """
    vals: list[float] = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2) * (10.0 ** (e - 6))
        vals += mids.tolist() + (-mids).tolist()
    assert len(vals) == 256
    return torch.tensor(sorted(vals), dtype=torch.float32)


DYNAMIC_CODE_VALUES = tuple(dynamic_code().tolist())


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (code sorted ascending), as uint8."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.to(x.device), out_int32=True).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, block: int = NESTED_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [n] -> (uint8 codes [n], float32 absmax [ceil(n / block)]) with the dynamic code."""
    n = x.numel()
    nb = math.ceil(n / block)
    xp = F.pad(x.float().reshape(-1), (0, nb * block - n)).view(nb, block)
    amax = xp.abs().amax(1)
    normed = xp / amax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    q = _nearest(normed, torch.tensor(DYNAMIC_CODE_VALUES, device=x.device))
    return q.reshape(-1)[:n], amax


def dequantize_blockwise_8bit(q: torch.Tensor, amax: torch.Tensor, block: int = NESTED_BLOCK) -> torch.Tensor:
    code = _DYN_TABLES.get(q.device)
    if code is None:
        code = _DYN_TABLES[q.device] = torch.tensor(DYNAMIC_CODE_VALUES, device=q.device)
    n = q.numel()
    vals = F.pad(code.index_select(0, q.int()), (0, amax.numel() * block - n)).view(-1, block)
    return (vals * amax[:, None]).reshape(-1)[:n]


_DYN_TABLES: dict[torch.device, torch.Tensor] = {}


def quantize_nf4(w: torch.Tensor, double_quant: bool = False) -> dict[str, torch.Tensor]:
    """Quantize any float tensor to the NF4 layout described in the module docstring (reference)."""
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    nb = math.ceil(n / BLOCK)
    blocks = F.pad(flat, (0, nb * BLOCK - n)).view(nb, BLOCK)
    absmax = blocks.abs().amax(1)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    idx = _nearest(normed, nf4_code(w.device))
    del normed, blocks
    packed = (idx[:, 0::2] << 4) | idx[:, 1::2]
    out = {"packed": packed.reshape(-1).contiguous()}
    if double_quant:
        offset = absmax.mean()
        q, amax2 = quantize_blockwise_8bit(absmax - offset)
        out.update(absmax=q, absmax2=amax2, absmax_offset=offset.reshape(1))
    else:
        out["absmax"] = absmax
    return out


def block_scales(absmax: torch.Tensor, absmax2: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 absmax per block of 64, undoing the double quantization when present."""
    if absmax.dtype != torch.uint8:
        return absmax.float()
    return dequantize_blockwise_8bit(absmax, absmax2) + offset


_BYTE_TABLES: dict[torch.device, torch.Tensor] = {}


def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two NF4 values a packed byte stands for (high nibble first)."""
    t = _BYTE_TABLES.get(device)
    if t is None:
        code = nf4_code()
        b = torch.arange(256)
        t = _BYTE_TABLES[device] = torch.stack([code[b >> 4], code[b & 15]], -1).to(device)
    return t


def dequantize_nf4_reference(packed: torch.Tensor, absmax: torch.Tensor, numel: int, dtype: torch.dtype,
                             absmax2: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch dequantization -> flat [numel] tensor of `dtype`."""
    pairs = _byte_table(packed.device).index_select(0, packed.int())  # [bytes, 2]: high, low nibble values
    scales = block_scales(absmax, absmax2, offset)
    return (pairs.view(-1, BLOCK) * scales[:, None]).reshape(-1)[:numel].to(dtype)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, numel: int, dtype: torch.dtype,
                   absmax2: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                   fused: bool = True) -> torch.Tensor:
    """Triton kernel on CUDA (or CPU under TRITON_INTERPRET=1 + TUNERY_TRITON_ON_CPU=1), else the reference."""
    from ..kernels import use_triton_for

    if use_triton_for(packed, fused):
        from .triton_nf4 import dequantize_nf4_triton

        return dequantize_nf4_triton(packed, absmax, numel, dtype, absmax2, offset)
    return dequantize_nf4_reference(packed, absmax, numel, dtype, absmax2, offset)


def probe_apply(fn, device: torch.device) -> tuple[torch.device, torch.dtype | None]:
    """What a Module._apply function does: the device it sends tensors to, and the float dtype it
    casts to (None when it keeps dtypes). Told apart with two empty probes of different dtypes."""
    p16 = fn(torch.empty(0, dtype=torch.float16, device=device))
    p32 = fn(torch.empty(0, dtype=torch.float32, device=device))
    cast = p16.dtype if p16.dtype == p32.dtype and p16.dtype.is_floating_point else None
    return p32.device, cast


class NF4Weight(nn.Module):
    """A frozen weight stored in NF4. Buffers (so `.to(device)` and `state_dict` carry them):
    `packed`, `absmax` and, with double quantization, `absmax2` and `absmax_offset`.

    It quacks like the weight it replaces where LoRA and the planner look: `shape`, `dtype` (the
    compute dtype that `dequantize()` returns), `device`, `numel()`. `.to(dtype)` on the model only
    changes that compute dtype; the stored bytes never change precision.
    """

    is_quantized = True

    def __init__(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.bfloat16,
                 double_quant: bool = False, device: torch.device | str | None = None):
        super().__init__()
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.double_quant = double_quant
        self.fused = True
        n = self.shape.numel()
        nb = math.ceil(n / BLOCK)
        self.register_buffer("packed", torch.empty(nb * BLOCK // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.empty(nb, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.empty(math.ceil(nb / NESTED_BLOCK), dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.empty(1, dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.empty(nb, dtype=torch.float32, device=device))
            self.absmax2 = self.absmax_offset = None

    @classmethod
    @torch.no_grad()
    def from_tensor(cls, w: torch.Tensor, double_quant: bool = False, dtype: torch.dtype | None = None) -> NF4Weight:
        """Quantize `w` on its own device; the compute dtype defaults to w's (float32 if w is not float)."""
        dtype = dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
        q = cls(w.shape, dtype, double_quant, device="meta")
        for name, t in quantize_nf4(w, double_quant).items():
            setattr(q, name, t)
        return q

    # -- tensor-like attributes -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def requires_grad(self) -> bool:
        return False

    def numel(self) -> int:
        return self.shape.numel()

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # -- compute ------------------------------------------------------------------------------
    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(packed, absmax, absmax2, absmax_offset), from _buffers when they are buffers: four
        nn.Module.__getattr__ lookups per dequantization cost ~5 us, ~250 times per step of an 8B
        model. Under FSDP they are frozen parameters (train/parallel.shard_quantized_storage)."""
        b = self._buffers
        if self.double_quant:
            t = (b.get("packed"), b.get("absmax"), b.get("absmax2"), b.get("absmax_offset"))
            if None not in t:
                return t
        else:
            p, a = b.get("packed"), b.get("absmax")
            if p is not None and a is not None:
                return p, a, None, None
        return self.packed, self.absmax, self.absmax2, self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        packed, absmax, absmax2, offset = self.storage()
        flat = dequantize_nf4(packed, absmax, self.shape.numel(), dtype or self.dtype, absmax2, offset,
                              fused=self.fused)
        return flat.view(self.shape)

    @staticmethod
    def dequantize_many(weights: list[NF4Weight], dtype: torch.dtype | None = None,
                        out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """weights[i].dequantize(dtype) for each i; in one kernel launch when the Triton path runs and
        2-3 weights of one kind are whole blocks long (q/k/v, gate/up), as views of one buffer.
        Why: a launch costs ~40 us of CPU, and the forward of a QLoRA block dequantizes 7 weights and
        its backward as many again, on the CPU-bound side of a step.

        `out` [sum of out-dims, >= in-dim]: the weights go to its left columns, stacked by rows (the
        fused LoRA paths keep the adapters' B in the columns to the right, kernels/lora.py)."""
        # one pass over the weights, their tensors from storage() (attribute reads through
        # nn.Module.__getattr__ cost ~30 us per call, ~130 calls per step of an 8B model)
        w0 = weights[0]
        dtype = dtype or w0.dtype
        k = w0.shape[-1]
        parts = [w.storage() for w in weights]
        dev = parts[0][0].device
        rows, fits, fast = 0, True, 2 <= len(weights) <= 3
        for w, part in zip(weights, parts):
            shape = w.shape
            rows += shape[0]
            fits = fits and len(shape) == 2 and shape[1] == k
            fast = (fast and w.fused and w.double_quant == w0.double_quant and shape.numel() % BLOCK == 0
                    and w.dtype == w0.dtype and part[0].device == dev)
        if out is not None and (out.dim() != 2 or out.stride(1) != 1 or out.shape[1] < k or out.dtype != dtype
                                or out.shape[0] != rows or not fits):
            raise ValueError(f"dequantize_many: out {tuple(out.shape)} does not fit weights "
                             f"{[tuple(w.shape) for w in weights]} ({dtype})")
        from ..kernels import use_triton_for

        if fast and (out is None or k % BLOCK == 0) and use_triton_for(parts[0][0]):
            from .triton_nf4 import dequantize_nf4_many_triton

            if out is None:
                buf = torch.empty(sum(w.numel() for w in weights), dtype=dtype, device=dev)
                outs = list(buf.split([w.numel() for w in weights]))
                dequantize_nf4_many_triton(parts, outs)
                return [o.view(w.shape) for o, w in zip(outs, weights)]
            rows = out.split([w.shape[0] for w in weights])
            dequantize_nf4_many_triton(parts, [r[0] for r in rows], k, out.stride(0))  # r[0]: where row 0 starts
            return [r[:, :k] for r in rows]
        ws = [w.dequantize(dtype) for w in weights]
        if out is None:
            return ws
        return [r[:, :k].copy_(w) for r, w in zip(out.split([w.shape[0] for w in weights]), ws)]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T + b without keeping the dequantized W for backward (frozen W and b)."""
        return _NF4Linear.apply(x, self, bias)

    def _apply(self, fn, recurse=True):
        # A model-wide `.to(dtype)` / `.half()` must not cast the stored codes or scales: only the
        # device moves, and a float cast becomes the new compute dtype.
        target, dtype = probe_apply(fn, self.packed.device)
        if dtype is not None:
            self.dtype = dtype
        for name, buf in list(self._buffers.items()):
            if buf is not None and buf.device != target:
                meta = buf.device.type == "meta" or target.type == "meta"
                self._buffers[name] = torch.empty_like(buf, device=target) if meta else buf.to(target)
        return self

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, dtype={self.dtype}, double_quant={self.double_quant}, "
                f"bytes={self.storage_bytes()}")


class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly; backward dequantizes again (saves nothing)."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias):
        from ..kernels import compute_dtype

        ctx.weight = weight
        # under autocast dequantize straight into the autocast dtype (no float32 copy of W to cast)
        dtype = compute_dtype(x)
        w = weight.dequantize(dtype)
        x = x.to(dtype)
        return F.linear(x, w, bias.to(dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = ctx.weight.dequantize(grad.dtype)
        return grad @ w, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer with NF4 storage (what `quantize_model` puts where LoRA is absent).

    `is_quantized_linear` lets `inject_lora` wrap it like an nn.Linear (weight and bias carry over).
    """

    is_quantized_linear = True

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        if bias is not None:
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            bias.requires_grad_(False)
        self.bias = bias

    @classmethod
    def from_linear(cls, lin: nn.Module, double_quant: bool = False) -> NF4Linear:
        return cls(NF4Weight.from_tensor(lin.weight, double_quant), lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def _is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(s in parts or name.endswith(s) for s in skip)


@torch.no_grad()
def quantize_model(model: nn.Module, skip: tuple[str, ...] = ("lm_head", "embed_tokens"),
                   double_quant: bool = False, compute_dtype: torch.dtype | None = None) -> list[str]:
    """Store the frozen base weight of every linear layer inside the decoder blocks in NF4, in place.

    Works before LoRA injection (nn.Linear -> NF4Linear, which `inject_lora` then wraps) and after it
    (a LoRALinear keeps its adapters; only its `weight` becomes an NF4Weight). Each weight is quantized
    on its own device and the 16-bit copy is dropped right away. `compute_dtype` (default: the
    weight's dtype) is what dequantization returns. Returns the quantized module paths.
    """
    dtype = compute_dtype
    done = []
    for name, module in list(model.named_modules()):
        if ".layers." not in f".{name}." or _is_skipped(name, skip):
            continue
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            continue
        if isinstance(module, nn.Linear):
            q = NF4Linear(NF4Weight.from_tensor(w, double_quant, dtype), module.bias)
            parent, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), leaf, q)
            done.append(name)
        elif hasattr(module, "lora_A") and hasattr(module, "base_weight"):  # LoRALinear
            q = NF4Weight.from_tensor(w, double_quant, dtype)
            del module.weight
            module.weight = q
            done.append(name)
    return done


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by NF4 storage in `model` (for reports and the planner's checks)."""
    return sum(m.storage_bytes() for m in model.modules() if isinstance(m, NF4Weight))
