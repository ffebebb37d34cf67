"""Spread one model over the processes torchrun started: FSDP2 (`fully_shard`) or plain DDP.

`fsdp: [full_shard, auto_wrap]` shards every decoder block, then the root (embeddings, final norm,
LM head), in place: the parameters become DTensor shards, so the optimizer built afterwards from the
model holds shards only. Without `fsdp` each process keeps a full replica (DDP).

Gradient scale: the loss of each micro-batch is already divided by the *global* number of trained
tokens of the step, so the gradients of the ranks must be summed, not averaged. FSDP2 is told so
(divide factor 1, sum reductions); DDP gets a communication hook that sums.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

try:  # public since torch 2.6
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )


def parallelize(model: nn.Module, cfg: Any, device: torch.device) -> nn.Module:
    """Return the module the loop runs forward/backward on (the model itself for FSDP, a DDP wrapper
    otherwise). Called once, after quantization, adapters, kernels and activation checkpointing."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if cfg.fsdp or (cfg.dp_replicate_size or 1) > 1:  # dp_replicate_size alone asks for HSDP
        shard_model(model, cfg, device)
        return model
    return replicate_model(model, device)


# ------------------------------------------------------------------------------------- FSDP2
def fsdp_options(cfg: Any) -> dict[str, Any]:
    """The fsdp list and fsdp_config keys, read once."""
    fc = cfg.fsdp_config
    opts = set(cfg.fsdp or [])
    version = fc.fsdp_version if fc else 2
    if version != 2:
        warnings.warn(f"fsdp_config.fsdp_version {version}: Tunery always uses FSDP2 (fully_shard); "
                      "the other fsdp_config keys keep their meaning", stacklevel=2)
    return {
        "reshard_after_forward": (fc.reshard_after_forward if fc else True) and "shard_grad_op" not in opts,
        "offload": bool((fc and fc.fsdp_offload_params) or "offload" in opts),
        "layer_cls": fc.fsdp_transformer_layer_cls_to_wrap if fc else None,
        "hybrid": "hybrid_shard" in opts,
        "sharded_state": (fc.fsdp_state_dict_type if fc else "SHARDED_STATE_DICT") == "SHARDED_STATE_DICT",
        "activation_checkpointing": bool(fc and fc.fsdp_activation_checkpointing),
    }


def build_mesh(cfg: Any, device: torch.device):
    """1-D mesh over all ranks, or the 2-D (replicate, shard) mesh of HSDP.

    HSDP replicas: `dp_replicate_size`, or with `fsdp: [hybrid_shard]` one replica per machine.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    replicas = cfg.dp_replicate_size
    if replicas is None and "hybrid_shard" in (cfg.fsdp or []):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        replicas = max(1, world // local)
    if replicas and replicas > 1:
        if world % replicas:
            raise ValueError(f"dp_replicate_size {replicas} does not divide the {world} processes: the shard groups "
                             "must all have the same size (set it to the number of machines, or a divisor of it)")
        return init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))


def mixed_precision(cfg: Any, device: torch.device) -> MixedPrecisionPolicy:
    """GPU: gather parameters in the compute dtype (bf16), reduce gradients in fp32. CPU: fp32 throughout."""
    if device.type != "cuda":
        return MixedPrecisionPolicy()
    from .loop import pick_device_dtype

    _, _, compute = pick_device_dtype(cfg, device.index or 0)
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def decoder_blocks(model: nn.Module, layer_cls: str | None = None) -> list[nn.Module]:
    """The units FSDP wraps: modules of class `fsdp_transformer_layer_cls_to_wrap` when it names a class
    of this model, else the decoder's layer list (own decoder: model.model.layers)."""
    if layer_cls:
        names = {n.strip() for n in layer_cls.split(",")}
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    for path in ("model.layers", "hf.model.layers", "hf.transformer.h", "hf.gpt_neox.layers", "hf.model.decoder.layers"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    lists = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] in
             ("layers", "h", "blocks")]
    if lists:
        return list(max(lists, key=len))
    raise ValueError("FSDP: cannot find the decoder blocks of this model; set fsdp_config."
                     "fsdp_transformer_layer_cls_to_wrap to the class name of its layers")


def shard_quantized_storage(model: nn.Module) -> int:
    """Make NF4 storage (buffers of NF4Weight) frozen parameters, so FSDP shards the 4-bit bytes too
    and all-gathers them per block like any weight. Returns how many tensors were moved."""
    moved = 0
    for m in model.modules():
        if not getattr(m, "is_quantized", False):
            continue
        for name in list(m._buffers):
            buf = m._buffers[name]
            if buf is None:
                continue
            del m._buffers[name]
            m.register_parameter(name, nn.Parameter(buf, requires_grad=False))
            moved += 1
    return moved


def shard_model(model: nn.Module, cfg: Any, device: torch.device) -> nn.Module:
    """fully_shard per decoder block, then the root; in place."""
    opts = fsdp_options(cfg)
    if opts["activation_checkpointing"] and not cfg.gradient_checkpointing:
        from .loop import _apply_checkpointing

        _apply_checkpointing(model, True)
    shard_quantized_storage(model)
    mesh = build_mesh(cfg, device)
    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": mixed_precision(cfg, device)}
    if opts["offload"]:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    blocks = decoder_blocks(model, opts["layer_cls"])
    raf = opts["reshard_after_forward"]
    for i, block in enumerate(blocks):
        # the last block's backward starts right after forward: keep it gathered
        fully_shard(block, reshard_after_forward=raf and i < len(blocks) - 1, **kw)
    # the root (embeddings, final norm, LM head) stays gathered after forward: the loss reads
    # `model.head_weight` after the forward returns; backward reshards it
    fully_shard(model, reshard_after_forward=False, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            _sum_gradients(m)
    return model


def _sum_gradients(m: FSDPModule) -> None:
    m.set_gradient_divide_factor(1.0)
    if hasattr(m, "set_force_sum_reduction_for_comms"):
        m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no AVG / PREMUL_SUM


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def sharded_state_dicts(cfg: Any) -> bool:
    """Whether FSDP checkpoints are saved sharded (DCP) rather than gathered to rank 0."""
    return fsdp_options(cfg)["sharded_state"]


# ------------------------------------------------------------------------------------- DDP
def _sum_allreduce_hook(state, bucket):  # no annotations: DDP checks them against the real classes
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


class ReplicatedModel(nn.parallel.DistributedDataParallel):
    """DDP that still answers the model's own attributes (`head_weight`, `cfg`, `logits`, ...)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module" or name.startswith("__"):
                raise
            return getattr(self.module, name)


def replicate_model(model: nn.Module, device: torch.device) -> nn.Module:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters to replicate: check adapter / lora_target_modules")
    ids = [device.index] if device.type == "cuda" else None
    # buffers (rope tables) are the same everywhere: no per-forward broadcast
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        nn.parallel.DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    ddp = ReplicatedModel(model, device_ids=ids, gradient_as_bucket_view=True, **sync)
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    return ddp


__all__ = ["ReplicatedModel", "build_mesh", "decoder_blocks", "fsdp_options", "is_sharded", "parallelize",
           "replicate_model", "shard_model", "shard_quantized_storage", "sharded_state_dicts"]
