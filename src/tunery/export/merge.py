"""`tunery merge`: fold a run's adapter into its base and write an HF folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .weights import save_model_folder

_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_dtype(base_path: str | Path | None) -> torch.dtype | None:
    """The dtype the base was published in (config.json `dtype`/`torch_dtype`), the default for the merge."""
    if base_path is None or not (Path(base_path) / "config.json").is_file():
        return None
    cfg = json.loads((Path(base_path) / "config.json").read_text())
    return _NAMES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or ""))


def merge_run(run: str | Path, out: str | Path | None = None, dtype: torch.dtype | str | None = None,
              max_shard_size: int | str = "5GB", device: str | None = None) -> Path:
    """Load RUN (or a checkpoint, or an adapter folder) in fp32, fold every LoRA layer into its base weight
    (a 4-bit base is dequantized first), and write an HF folder: sharded safetensors, config.json,
    generation_config.json, tokenizer and chat template. Default `out`: RUN/merged. Default dtype: the
    base's published dtype. Returns the folder."""
    from ..inference import describe_target, load_for_inference

    info = describe_target(run)
    if out is None:
        root = info["run_dir"] or Path(run)
        out = Path(root) / "merged"
    model, tokenizer, info = load_for_inference(run, device=device or "cpu", dtype=torch.float32)
    if isinstance(dtype, str):
        if dtype not in _NAMES:
            raise ValueError(f"dtype {dtype!r}: choose one of {sorted(_NAMES)}")
        dtype = _NAMES[dtype]
    target_dtype = dtype or base_dtype(info["path"]) or torch.float32
    return save_model_folder(model, info["path"], tokenizer, out, dtype=target_dtype, max_shard_bytes=max_shard_size)


def merged_folder(run: str | Path, work_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """An HF folder holding RUN's weights: the model itself for a base or full fine-tune, else a merge
    into `work_dir` (default RUN/merged). Used by the GGUF export."""
    from ..inference import describe_target

    info = describe_target(run)
    if info["kind"] == "model":
        return Path(info["model_dir"]), info
    if info["kind"] == "base":
        from ..models import resolve_model_path

        return resolve_model_path(info["base_model"]), info
    root = info["run_dir"] or Path(run)
    out = Path(work_dir) if work_dir is not None else Path(root) / "merged"
    return merge_run(run, out), info
