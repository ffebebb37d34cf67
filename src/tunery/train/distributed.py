"""Process-group facts for torchrun launches, and the few collectives the loop needs.

The engine is PyTorch's own: torchrun starts the processes, the process group is NCCL on GPUs (with
gloo beside it for CPU tensors) and gloo on CPU. FSDP2 / DDP wiring lives in parallel.py, sharded
checkpoints in dcp.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def backend() -> str:
    """NCCL for CUDA tensors plus gloo for CPU ones (offloaded grads, CPU state dicts); gloo without CUDA."""
    return "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"


def init(timeout_s: int = 1800) -> tuple[int, int, int]:
    """Join the process group torchrun describes (no-op for one process). `timeout_s` (ddp_timeout)
    bounds every collective, the wait for rank 0's tokenization included."""
    rank, local, size = world()
    if size > 1 and not dist.is_initialized():
        kw = {}
        if torch.cuda.is_available():
            if local >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPU(s): "
                                   "start at most one process per GPU (--nproc / --nproc-per-node)")
            torch.cuda.set_device(local)
            kw["device_id"] = torch.device("cuda", local)
        dist.init_process_group(backend(), timeout=timedelta(seconds=timeout_s), **kw)
    return rank, local, size


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop signal that reached only some ranks)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (the object itself without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Run the body on local rank 0 of each machine first, then on the others.

    Used for data preparation: rank 0 tokenizes and writes the cache while the others wait at a
    barrier (bounded by ddp_timeout), then they read the cache instead of tokenizing again.
    """
    if not dist.is_initialized():
        yield
        return
    first = world()[1] == 0
    if not first:
        _barrier_or_explain()
    try:
        yield
    finally:
        if first:
            _barrier_or_explain()


def _barrier_or_explain() -> None:
    try:
        dist.barrier()
    except Exception as e:
        raise RuntimeError("a rank timed out waiting for rank 0 to prepare the data: raise `ddp_timeout` "
                           "(seconds) in the config, or run `tunery preprocess CONFIG` once beforehand "
                           f"so the cache is ready ({type(e).__name__}: {e})") from e


def sync_gradients(model: torch.nn.Module, sync: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-batch of a step (`no_sync`).

    FSDP reduce-scatters every micro-batch (keeping accumulated gradients sharded), so this is a
    no-op there and for one process.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None, as_tensor: bool = False):
    """Global L2 norm of the gradients (clipped to `max_norm` when set); works for FSDP2's DTensor
    gradients, whose norm is reduced over the shards. `as_tensor`: the norm stays on the device
    (no host sync), else a float."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(()) if as_tensor else 0.0
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, foreach=False)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return total.detach() if as_tensor else float(total)


def reshard(model: torch.nn.Module) -> None:
    """FSDP: put every module back on its sharded parameters. A forward without backward (eval, a
    method's setup) leaves the root gathered, and then `model.parameters()` are the gathered copies,
    not the shards the optimizer and checkpoints must see. No-op without FSDP."""
    import sys

    if "torch.distributed.fsdp" not in sys.modules:
        return
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
