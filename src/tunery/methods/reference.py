"""The reference policy of DPO and KTO, without a second copy of the model where that is possible.

Modes, chosen once in `build_reference` (before the first optimizer step, while the policy still is the reference):

- `adapter_off`: a freshly initialised LoRA (every lora_B zero, nothing else trainable): the reference is the base
  model, i.e. the same model with every LoRA layer switched off. No copy, no extra memory.
- `snapshot`: a LoRA that does not start at zero (`lora_model_dir`) or with fully trained modules
  (`lora_modules_to_save`): switching the adapter off would give the base, not the starting policy, so the starting
  values of the trainable tensors (small) are kept and swapped in for the reference forward (as trl does with its
  "ref" adapter copy).
- `copy`: full fine-tuning: a frozen deep copy in eval mode.
- `precomputed`: `precompute_ref_log_probs: true`: reference log-probs of every row computed once before training
  (cached on disk by data fingerprint and a probe of the weights) and read from the batch; nothing is kept.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..adapters.lora import adapters_disabled, lora_layers
from ..atomic import write_text
from .sequences import flat_rows_batch, forward_hidden, sequence_logps

LORA_TENSORS = (".lora_A", ".lora_B")


class Reference:
    def __init__(self, mode: str, frozen: nn.Module | None = None,
                 snapshot: list[tuple[nn.Parameter, torch.Tensor]] | None = None):
        self.mode = mode
        self.frozen = frozen
        self.snapshot = snapshot or []

    @contextlib.contextmanager
    def use(self, policy: nn.Module) -> Iterator[nn.Module]:
        """The module that computes reference log-probs (call under torch.no_grad, before the policy forward:
        the snapshot mode rewrites trainable tensors in place and restores them on exit)."""
        if self.mode == "adapter_off":
            with adapters_disabled(policy):
                yield policy
        elif self.mode == "copy":
            yield self.frozen  # type: ignore[misc]
        elif self.mode == "snapshot":
            with torch.no_grad():
                current = [p.detach().clone() for p, _ in self.snapshot]
                for p, start in self.snapshot:
                    p.copy_(start)
            try:
                yield policy
            finally:
                with torch.no_grad():
                    for (p, _), now in zip(self.snapshot, current):
                        p.copy_(now)
        elif self.mode == "self":
            yield policy
        else:
            raise RuntimeError("reference log-probs were precomputed but this batch does not carry them: the "
                               "collate function must pass ref_* row fields through")


def _is_lora_tensor(name: str) -> bool:
    return any(t in name for t in LORA_TENSORS)


def build_reference(model: nn.Module, ignore: tuple[str, ...] = ()) -> Reference:
    """Pick the cheapest exact reference for `model` as it is now (call before training starts).

    `ignore`: trainable parameter name prefixes that are not part of the policy's log-probs (e.g. a score head).
    """
    layers = lora_layers(model)
    if not layers:
        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        return Reference("copy", frozen=frozen)
    trainable = [(n, p) for n, p in model.named_parameters()
                 if p.requires_grad and not any(n.startswith(i) for i in ignore)]
    others = [n for n, _ in trainable if not _is_lora_tensor(n)]
    zero_init = all(not bool(m.lora_B.detach().any()) for m in layers.values())
    if zero_init and not others:
        return Reference("adapter_off")
    return Reference("snapshot", snapshot=[(p, p.detach().clone()) for _, p in trainable])


# ---- precomputed reference log-probs -------------------------------------------------------------------------

def cache_dir() -> Path:
    from ..models.embedded import cache_root

    return cache_root() / "ref_logps"


def weights_probe(model: nn.Module) -> str:
    """A cheap fingerprint of the weights the reference runs with (a strided sample of every tensor)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            flat = t.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            sample = flat[:: max(1, flat.numel() // 4096)].float()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{sample.sum().item():.8e}{sample.abs().sum().item():.8e}".encode())
    return h.hexdigest()


def precompute_key(method: str, fingerprint: str, model: nn.Module, extra: Any = None) -> str | None:
    if not fingerprint:
        return None
    payload = json.dumps([method, fingerprint, weights_probe(model), extra], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def precompute_into_rows(
    model: nn.Module, prepared: Any, key: str | None, fields: tuple[str, ...],
    compute: Callable[[list[dict[str, Any]]], dict[str, list[float]]], rows_per_batch: int,
) -> dict[str, Any]:
    """Fill `fields` of every train and eval row with `compute(rows)` (run under no_grad, eval mode), reading
    and writing a JSON cache under `key`. Returns {"cached": bool, "rows": n}."""
    splits = [("train", prepared.train), ("eval", prepared.eval or [])]
    was_training = model.training
    cached_all = True
    total = 0
    try:
        model.eval()
        for split, rows in splits:
            if not rows:
                continue
            total += len(rows)
            path = cache_dir() / f"{key}-{split}.json" if key else None
            values: dict[str, list[float]] | None = None
            if path is not None and path.is_file():
                loaded = json.loads(path.read_text())
                if all(len(loaded.get(f, [])) == len(rows) for f in fields):
                    values = loaded
            if values is None:
                cached_all = False
                values = {f: [] for f in fields}
                with torch.no_grad():
                    for s in range(0, len(rows), rows_per_batch):
                        part = compute(rows[s : s + rows_per_batch])
                        for f in fields:
                            values[f].extend(part[f])
                if path is not None:
                    write_text(path, json.dumps(values))
            for i, r in enumerate(rows):
                for f in fields:
                    r[f] = values[f][i]
    finally:
        model.train(was_training)
    return {"cached": cached_all, "rows": total}


def precompute_reference(method: str, model: nn.Module, cfg: Any, prepared: Any, fields: tuple[str, str],
                         first: Callable[[dict[str, Any]], tuple], second: Callable[[dict[str, Any]], tuple]
                         ) -> dict[str, Any]:
    """`precompute_ref_log_probs`: the reference's summed log-probs of two sequences per row, first(row)
    and second(row) as (input_ids, labels), computed once (both in one batch) into fields[0] and fields[1]."""
    def compute(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
        seqs = [first(r) for r in rows] + [second(r) for r in rows]
        batch = to_device(flat_rows_batch(seqs), model_device(model))
        s = sequence_logps(model, forward_hidden(model, batch), batch, len(seqs)).sums.tolist()
        return {fields[0]: s[: len(rows)], fields[1]: s[len(rows):]}

    rows_per_batch = max(getattr(cfg, "eval_batch_size", None) or 0, getattr(cfg, "micro_batch_size", 1), 1)
    key = precompute_key(method, prepared.fingerprint, model)
    return precompute_into_rows(model, prepared, key, fields, compute, rows_per_batch)
