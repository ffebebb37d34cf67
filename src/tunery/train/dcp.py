"""Checkpoints of sharded (FSDP2) runs through torch.distributed.checkpoint, and the bridges that let
any checkpoint resume on any number of processes.

Two on-disk layouts share one folder shape (`checkpoints/step-N/` with trainer_state.json, state.pt
and, for adapters, a consolidated adapter/):

- one-process layout (checkpoint.py): trainable.safetensors + optimizer.pt (indexed by position).
  Written by one process, by rank 0 under DDP, and under FSDP with
  `fsdp_state_dict_type: FULL_STATE_DICT` (gathered to rank 0).
- sharded layout: dcp/ (DCP files: trainable weights and optimizer state, keyed by parameter name,
  each rank writing its own shards) + rng/rank-R.pt. Written by every rank under FSDP.

`load` reads either layout into a plain, DDP or FSDP model: DCP reshards on load, so a run saved by
2 processes resumes on 1 or 4; a one-process checkpoint is spread over the shards of an FSDP run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from ..atomic import publish
from .checkpoint import load_checkpoint, rng_state, set_rng_state
from .distributed import reshard
from .optim import trainable_parameters
from .parallel import is_sharded, sharded_state_dicts

DCP_DIR = "dcp"
TRAINABLE = StateDictOptions(ignore_frozen_params=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _trainable_state_dicts(model: nn.Module, optimizer, options: StateDictOptions = TRAINABLE):
    """get_state_dict without frozen tensors. (ignore_frozen_params misses the second name of a tied
    frozen weight, e.g. lm_head.weight tied to the embeddings under LoRA, so those are dropped here.)"""
    msd, osd = get_state_dict(model, optimizer, options=options)
    frozen = {_canonical(n) for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in msd.items() if k not in frozen}, osd


def _canonical(name: str) -> str:
    """Parameter name as torch.distributed.checkpoint.state_dict spells it (wrapper prefixes dropped)."""
    for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


# ------------------------------------------------------------------------------- save
def save(ckpt_dir: Path, model: nn.Module, optimizer, scheduler, trainer_state: dict[str, Any],
         write_weights: Callable[[Path], None] | None = None, sharded: bool = True) -> Path:
    """Write a checkpoint of an FSDP model; every rank calls it. `sharded=False` gathers the weights and
    optimizer state to rank 0 and writes the one-process layout (fsdp_state_dict_type: FULL_STATE_DICT).

    Written into a temp folder beside the target and renamed by rank 0 once all ranks are done, so a
    crash never leaves half a checkpoint. `write_weights(folder)` writes the consolidated adapter.
    """
    ckpt_dir = Path(ckpt_dir)
    rank = _rank()
    reshard(model)  # after an eval forward the root holds gathered parameters
    tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp-dist"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    ok = False
    try:
        if sharded:
            msd, osd = _trainable_state_dicts(model, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / DCP_DIR))
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(rng_state(), tmp / "rng" / f"rank-{rank}.pt")
        else:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            msd, osd = _trainable_state_dicts(model, optimizer, full)
            if rank == 0:
                names = {_canonical(n) for n, _ in trainable_parameters(model)}
                save_file({k: v.contiguous() for k, v in msd.items() if k in names}, str(tmp / "trainable.safetensors"))
                torch.save(_indexed_optimizer_state(optimizer, model, osd), tmp / "optimizer.pt")
            del msd, osd
        if write_weights is not None:
            with consolidated(model, trainable_only=True) as main:
                if main:
                    write_weights(tmp)
        if rank == 0:
            torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
            state = dict(trainer_state, format="dcp" if sharded else "full", world_size=_world())
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        ok = True
    finally:
        _barrier()  # every rank's shards are on disk (or someone failed)
        if rank == 0:
            if ok:
                publish(tmp, ckpt_dir, sync=True)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
    return ckpt_dir


def _indexed_optimizer_state(optimizer, model: nn.Module, osd: dict[str, Any]) -> dict[str, Any]:
    """Name-keyed optimizer state (DCP style) -> torch's position-keyed one (optimizer.pt)."""
    names = _param_names(model)
    out: dict[str, Any] = {"state": {}, "param_groups": []}
    index = 0
    for group, saved in zip(optimizer.param_groups, osd["param_groups"]):
        ids = []
        for p in group["params"]:
            name = names[id(p)]
            if name in osd["state"]:
                out["state"][index] = osd["state"][name]
            ids.append(index)
            index += 1
        out["param_groups"].append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), _canonical(n))
    return names


# ------------------------------------------------------------------------------- load
def load(ckpt_dir: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Resume from either layout into this run's model (plain, DDP-replicated or FSDP-sharded);
    every rank calls it. Returns trainer_state.json."""
    ckpt_dir = Path(ckpt_dir)
    trainer_state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    reshard(model)
    if (ckpt_dir / DCP_DIR).is_dir():
        _load_dcp(ckpt_dir, model, optimizer)
    elif is_sharded(model):
        _load_full_into_sharded(ckpt_dir, model, optimizer)
    else:
        return load_checkpoint(ckpt_dir, model, optimizer, scheduler)
    extra = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)  # Tunery's own file
    scheduler.load_state_dict(extra["scheduler"])
    own = ckpt_dir / "rng" / f"rank-{_rank()}.pt"
    if own.is_file() and trainer_state.get("world_size") == _world():
        set_rng_state(torch.load(own, map_location="cpu", weights_only=False))
    else:
        set_rng_state(extra["rng"])
    return trainer_state


def _load_dcp(ckpt_dir: Path, model: nn.Module, optimizer) -> None:
    msd, osd = _trainable_state_dicts(model, optimizer)
    try:
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt_dir / DCP_DIR))
    except Exception as e:
        raise ValueError(f"{ckpt_dir}: cannot load this sharded checkpoint into the model ({e}); was it written "
                         "by a run with another adapter, model or optimizer?") from e
    # not strict: the tied twin of a frozen weight is left out on purpose; dcp.load above already
    # failed if the checkpoint lacked any trainable tensor
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _load_full_into_sharded(ckpt_dir: Path, model: nn.Module, optimizer) -> None:
    """One-process layout -> FSDP shards: every rank reads the full tensors and keeps its shard."""
    state = load_file(str(ckpt_dir / "trainable.safetensors"))
    names = [_canonical(n) for n, _ in trainable_parameters(model)]
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{ckpt_dir}: checkpoint lacks trainable tensors {missing[:3]} "
                         "(was it written by a run with another adapter or model?)")
    full = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
    set_model_state_dict(model, {n: state[n] for n in names}, options=full)
    saved = torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, _named_optimizer_state(optimizer, model, saved), options=full)


def _named_optimizer_state(optimizer, model: nn.Module, saved: dict[str, Any]) -> dict[str, Any]:
    """torch's position-keyed optimizer state -> name-keyed (what set_optimizer_state_dict takes)."""
    names = _param_names(model)
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError("optimizer.pt has another parameter-group layout than this run's optimizer")
    state: dict[str, Any] = {}
    groups = []
    for group, g in zip(optimizer.param_groups, saved["param_groups"]):
        if len(g["params"]) != len(group["params"]):
            raise ValueError("optimizer.pt holds another number of parameters than this run trains")
        fqns = [names[id(p)] for p in group["params"]]
        for fqn, idx in zip(fqns, g["params"]):
            if idx in saved["state"]:
                state[fqn] = saved["state"][idx]
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": fqns})
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------- consolidated weights
@contextlib.contextmanager
def consolidated(model: nn.Module, trainable_only: bool) -> Iterator[bool]:
    """Inside, rank 0's model holds full (unsharded, CPU) parameters, so the one-process writers
    (PEFT adapter, safetensors folder) work unchanged; yields whether this rank should write.

    Every rank must enter (each parameter is all-gathered in turn, one at a time, so no rank ever
    holds more than one full parameter on the device). Without FSDP it only says who is rank 0.
    `trainable_only` gathers just the trained parameters (an adapter), not the frozen base.
    """
    if not is_sharded(model):
        yield _rank() == 0
        return
    reshard(model)  # eval leaves the root gathered; swap against the sharded parameters
    main = _rank() == 0
    full: dict[int, nn.Parameter] = {}
    for _, p in model.named_parameters():  # the same order on every rank; tied weights once
        if trainable_only and not p.requires_grad:
            continue
        t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if main:
            full[id(p)] = nn.Parameter(t.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
        del t
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for mod in model.modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None and id(p) in full:
                    mod._parameters[pname] = full[id(p)]  # tied weights stay tied
                    swapped.append((mod, pname, p))
        yield main
    finally:
        for mod, pname, p in reversed(swapped):
            mod._parameters[pname] = p
        _barrier()


__all__ = ["DCP_DIR", "consolidated", "is_sharded", "load", "reshard", "save", "sharded_state_dicts"]
