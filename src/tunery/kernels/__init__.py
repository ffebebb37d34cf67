"""Fused ops. Each module: a Triton kernel, a plain-PyTorch reference, and the function that picks one.

Only torch and triton may be imported here (DESIGN.md).

The fused paths run for CUDA tensors. On CPU they run only under `TRITON_INTERPRET=1` together with
`TUNERY_TRITON_ON_CPU=1` (the parity tests); TRITON_INTERPRET must be set before this package is
imported, because triton reads it when a kernel is defined. `set_kernels_enabled(False)` (the
config's `kernels: false`) turns every fused path off for the process.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_ENABLED = True


def set_kernels_enabled(enabled: bool) -> None:
    """Process-wide switch: False makes every op take its plain-PyTorch reference."""
    global _ENABLED
    _ENABLED = bool(enabled)


def kernels_enabled() -> bool:
    return _ENABLED


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


_TRITON = _probe_triton()


def triton_available() -> bool:
    """Triton runs on a CUDA GPU, or on CPU under TRITON_INTERPRET=1 (tests)."""
    return _TRITON


def interpret_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("TUNERY_TRITON_ON_CPU") == "1"


_INTERPRET_CPU = interpret_on_cpu()  # triton decides interpret-or-compile when a kernel is defined (import)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's when it is on, else x's. Custom autograd Functions see
    no autocast casts of their inputs (fp32 master weights in full fine-tuning), so they ask this."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


_STEP = [0]  # optimizer steps taken in this process (any optimizer): cached casts go stale with it


def _count_step(*_args) -> None:
    _STEP[0] += 1


register_optimizer_step_post_hook(_count_step)


def params_changed() -> None:
    """The parameters changed where no optimizer-step hook saw it (a CUDA-graph replay of a step): the
    next lookup of a cached cast refreshes them all (and a capture records that refresh)."""
    _STEP[0] += 1


def cast_params(ts: list[torch.Tensor], dtype: torch.dtype, scale: float | tuple[float, ...] = 1.0) -> torch.Tensor:
    """The parameters `ts` cast to `dtype`, times `scale`, concatenated along dim 0, cached on the
    first of them until any optimizer steps or one of them changes (version, storage). A single
    parameter that already has `dtype` (and scale 1) comes back as it is.

    Why: the fused LoRA paths need the fp32 master adapters in bf16 several times per step (forward,
    backward, recompute), the LoRA scale folded in. Casting each time costs a kernel launch and ~20 us
    of Python apiece, ~30 per block, and a QLoRA step of a large model waits on the CPU; so does this
    lookup (~750 calls per step of an 8B model), hence plain type checks and no generators. A fused
    optimizer step does not bump tensor versions, hence the global step count. After a step, the
    first lookup refreshes every cached copy in place with two multi-tensor kernels (_refresh_all)
    instead of ~350 casts of a few launches each. Plain tensors are cast, never cached.
    """
    if scale == 1.0 and len(ts) == 1 and ts[0].dtype == dtype:
        return ts[0]
    return _cached(ts, (dtype, scale, len(ts), id(ts[-1])), _cast, dtype, scale)


def cached_block_diag(ts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """torch.block_diag of the parameters `ts` in `dtype`, cached and refreshed like cast_params.

    Why: the fused QLoRA projections run the adapters' B inside the base GEMM as a block-diagonal
    [sum out_i, sum r_i] (kernels/lora.py); rebuilt after every step it cost ~40 us of CPU per group,
    and 64 of them per step of an 8B model, all at the first block. Refreshed in place, its diagonal
    blocks join _refresh_all's one multi-tensor copy and the zeros around them never change."""
    return _cached(ts, ("block_diag", dtype, len(ts), id(ts[-1])), _block_diag, dtype, 1.0)


def _cached(ts, which: tuple, make, dtype: torch.dtype, scale) -> torch.Tensor:
    """The cache behind cast_params and cached_block_diag. An entry, kept in the first parameter's
    __dict__ under `which`: (stamp, out, weakrefs of ts, scale, parts), where parts[i] is the view of
    `out` that holds ts[i] (times its scale) and stamp is [step, version, data_ptr, ...] of ts."""
    stamp = [_STEP[0]]
    for t in ts:
        if type(t) is not _Parameter and not isinstance(t, _Parameter):
            return make(ts, dtype, scale)[0]
        stamp.append(t._version)
        stamp.append(t.data_ptr())
    cache = ts[0].__dict__.get("_tunery_casts")
    if cache is None:
        cache = ts[0]._tunery_casts = {}
    hit = cache.get(which)
    if hit is not None:
        if hit[0] == stamp:
            return hit[1]
        if _REFRESHED[0] != _STEP[0]:
            _refresh_all()
            hit = cache.get(which)
            if hit[0] == stamp:
                return hit[1]
    out, parts = make(ts, dtype, scale)
    cache[which] = (stamp, out, [weakref.ref(t) for t in ts], scale, parts)
    _PLAN[0] = None  # the refresh plan lists the entries: made again at the next refresh
    if hit is None:  # a stale entry replaced here is listed already
        _LIVE.append((weakref.ref(ts[0]), which))
    return out


_LIVE: list[tuple[weakref.ref, tuple]] = []  # (first parameter, cache key) of every cached copy
_REFRESHED = [-1]  # the optimizer step count of the last _refresh_all
# _refresh_all's plan, kept from one step to the next while no entry is added or replaced: (first
# parameter (weak), cache key, data_ptrs) of each entry to refresh. Weak: a deleted model's
# adapters and cached copies are not kept alive by it.
_PLAN: list = [None]


def _refresh_all() -> None:
    """Recompute every stale cached copy in place (same tensors, new values) whose parameters kept
    their storage and shapes: one multi-tensor copy (with the cast) and one multiply per scale.

    Which entries to refresh is worked out once and kept (_PLAN) while none is added or replaced:
    worked out each step it cost ~5 ms of CPU per step of an 8B model, at its first block (a split and
    a detach per entry). Each step then only checks every parameter is alive at the same storage."""
    _REFRESHED[0] = _STEP[0]
    lists = _planned(_PLAN[0]) if _PLAN[0] is not None else None
    if lists is None:
        _PLAN[0] = _make_plan()
        lists = _planned(_PLAN[0]) or ((), {})
    copies, scaled = lists
    with torch.no_grad():
        for dst, src in copies:
            if dst:
                torch._foreach_copy_(dst, src)
        for s, parts in scaled.items():
            torch._foreach_mul_(parts, s)


def _planned(plan: list) -> tuple | None:
    """((views to fill, their parameters) for the dense views and for the strided ones, views per
    scale) of the planned entries, each entry stamped with this step; None, and nothing stamped, if an
    entry is gone or a parameter moved or changed shape (the plan is made again). Dense (concatenated
    casts) and strided (block-diagonal blocks) apart: one strided view would send the whole
    multi-tensor copy down its per-tensor path."""
    step = _STEP[0]
    dense: tuple[list, list] = ([], [])
    strided: tuple[list, list] = ([], [])
    scaled: dict[float, list[torch.Tensor]] = {}
    stamped = []
    for ref, which, ptrs in plan:
        first = ref()
        cache = first.__dict__.get("_tunery_casts") if first is not None else None
        entry = cache.get(which) if cache is not None else None
        if entry is None:
            return None
        _, out, refs, scale, parts = entry
        dst, src = strided if which[0] == "block_diag" else dense
        new = [step]
        for r, p, part in zip(refs, ptrs, parts):
            t = r()
            if t is None or t.data_ptr() != p or t.shape != part.shape:
                return None
            new.append(t._version)
            new.append(p)
            src.append(t)
        dst += parts
        if isinstance(scale, tuple):
            for part, s in zip(parts, scale):
                if s != 1.0:
                    scaled.setdefault(s, []).append(part)
        elif scale != 1.0:
            scaled.setdefault(scale, []).extend(parts)
        stamped.append((cache, which, new, entry))
    for cache, which, new, entry in stamped:
        cache[which] = (new, *entry[1:])
    return (dense, strided), scaled


def _make_plan() -> list:
    """Every live entry whose parameters kept their storage (one that moved is cast again when next
    asked); drops the dead ones from _LIVE."""
    plan, live = [], []
    for ref, which in _LIVE:
        first = ref()
        cache = first.__dict__.get("_tunery_casts") if first is not None else None
        entry = cache.get(which) if cache is not None else None
        ts = [r() for r in entry[2]] if entry is not None else []
        if entry is None or any(t is None for t in ts):
            continue
        live.append((ref, which))
        ptrs = [t.data_ptr() for t in ts]
        if ptrs == entry[0][2::2] and all(t.shape == p.shape for t, p in zip(ts, entry[4])):
            plan.append((ref, which, ptrs))
    _LIVE[:] = live
    return plan


_Parameter = torch.nn.Parameter


def _cast(ts: list[torch.Tensor], dtype: torch.dtype, scale: float | tuple[float, ...]) -> tuple:
    """(cat(ts) in `dtype` times `scale` (one factor, or one per tensor), the part of it from each t)."""
    with torch.no_grad():
        if isinstance(scale, tuple):
            out = torch.cat([t.detach().to(dtype) * s for t, s in zip(ts, scale, strict=True)])
        else:
            out = torch.cat([t.detach() for t in ts]).to(dtype) if len(ts) > 1 else ts[0].detach().to(dtype)
            if scale != 1.0:
                out = out * scale if out.data_ptr() == ts[0].data_ptr() else out.mul_(scale)
    return out, (list(out.split([t.shape[0] for t in ts])) if len(ts) > 1 else [out])


def _block_diag(ts: list[torch.Tensor], dtype: torch.dtype, scale: float = 1.0) -> tuple:
    """(block_diag(ts) in `dtype`, the diagonal block of each t)."""
    with torch.no_grad():
        out = torch.block_diag(*[t.detach().to(dtype) for t in ts])
    parts, r, c = [], 0, 0
    for t in ts:
        parts.append(out[r : r + t.shape[0], c : c + t.shape[1]])
        r, c = r + t.shape[0], c + t.shape[1]
    return out, parts


def with_host_copy(device_t: torch.Tensor, host_t: torch.Tensor) -> torch.Tensor:
    """Remember that `host_t` (CPU) holds the values of `device_t`. Readers that need the values on
    the host (the CPU-held embedding's ids, the loss's count of ignored labels) take them from there
    instead of copying them back, a sync that waits for all queued GPU work and stops the CPU from
    queueing the next step ahead of the GPU. Returns `device_t`."""
    device_t._tunery_host = (host_t, device_t._version, device_t.shape)
    return device_t


_STATIC_ROWS = [False]


class static_rows:
    """While on, ops that would choose rows on the host from the data (the fused cross-entropy dropping
    ignored labels) keep every row instead, so the launched work does not depend on the values: a
    captured CUDA graph (train/cuda_graph.py) replays it for other batches."""

    def __enter__(self):
        self.old = _STATIC_ROWS[0]
        _STATIC_ROWS[0] = True
        return self

    def __exit__(self, *exc):
        _STATIC_ROWS[0] = self.old


def rows_are_static() -> bool:
    return _STATIC_ROWS[0]


def host_copy(t: torch.Tensor) -> torch.Tensor | None:
    """The host copy set by with_host_copy, if `t` has not changed since (same version and shape)."""
    rec = getattr(t, "_tunery_host", None)
    if rec is None or rec[1] != t._version or rec[2] != t.shape:
        return None
    return rec[0]


def use_triton_for(x: torch.Tensor, enabled: bool | None = True) -> bool:
    """Fused path for CUDA tensors; on CPU only when TRITON_INTERPRET=1 asks for it.

    `enabled=None` means "auto" (same as True); False always gives the reference.
    """
    if enabled is False or not _ENABLED or not _TRITON:
        return False
    if x.is_cuda:
        return True
    return _INTERPRET_CPU and x.device.type == "cpu"


def num_programs(x: torch.Tensor, per_sm: int = 4) -> int:
    """Persistent-grid size: a few programs per SM on a GPU, a handful under the interpreter."""
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count * per_sm
    return 4
