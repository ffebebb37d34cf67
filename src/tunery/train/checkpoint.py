"""Atomic checkpoints with everything exact resume needs: weights, optimizer, scheduler, RNG, data position."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..atomic import atomic_output
from .optim import trainable_parameters

STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in trainable_parameters(model)}


def save_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer, scheduler, trainer_state: dict[str, Any],
                    write_weights=None) -> Path:
    """Write to a temp folder beside the target, fsync, then rename: a crash never leaves half a checkpoint.

    `write_weights(folder)` writes the user-facing weights (adapter/ or model/) into the checkpoint too.
    """
    ckpt_dir = Path(ckpt_dir)
    with atomic_output(ckpt_dir, folder=True, sync=True) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(_plain_groups(optimizer.state_dict()), tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        if write_weights is not None:
            write_weights(tmp)
    return ckpt_dir


def _plain_groups(state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's hyperparameters as numbers: under cuda_graph the learning rate is a device tensor
    (train/cuda_graph.py), which a resumed run would load onto the CPU and a new capture would then read
    once and keep, whatever the schedule says later."""
    for group in state["param_groups"]:
        for k, v in group.items():
            if k != "params" and isinstance(v, torch.Tensor) and v.numel() == 1:
                group[k] = v.item()
    return state


def load_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    ckpt_dir = Path(ckpt_dir)
    state = load_file(str(ckpt_dir / "trainable.safetensors"))
    params = dict(trainable_parameters(model))
    missing = set(params) - set(state)
    if missing:
        raise ValueError(f"{ckpt_dir}: checkpoint lacks trainable tensors {sorted(missing)[:3]} "
                         "(was it written by a run with another adapter or model?)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))
    # optimizer.pt is Tunery's own file: weights_only keeps unpickling safe
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=True))
    extra = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return json.loads((ckpt_dir / "trainer_state.json").read_text())


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(spec: str | None, run_dir: Path) -> Path | None:
    if not spec:
        return None
    if spec == "auto":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1][1] if ckpts else None
    p = Path(spec)
    if not (p / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {p} is not a Tunery checkpoint (no trainer_state.json)")
    return p


def prune_checkpoints(run_dir: Path, keep: int | None) -> None:
    if not keep:
        return
    for _, p in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
