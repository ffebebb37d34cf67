"""manifest.json: what reproduces a run months later (config hash, data fingerprints, versions, hardware)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text


def config_hash(resolved: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain"], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        pass
    return None


def hardware() -> dict[str, Any]:
    hw: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        hw["cuda"] = torch.version.cuda
    return hw


def build_manifest(resolved: dict[str, Any], data_files: dict[str, str], data_fingerprint: str, model_path: str,
                   world_size: int = 1) -> dict[str, Any]:
    src = Path(__file__).resolve().parents[1]  # the tunery package folder
    return {
        "created": datetime.now(timezone.utc).isoformat(),
        "config_hash": config_hash(resolved),
        "seed": resolved.get("seed"),
        "data": {"fingerprint": data_fingerprint, "files": data_files},
        "model": {"base_model": resolved.get("base_model"), "resolved_path": model_path},
        "versions": {k: _version(k) for k in ("tunery", "torch", "transformers", "tokenizers", "safetensors",
                                               "pydantic", "triton", "peft", "datasets")},
        "git_commit": {"tunery": _git_commit(src), "cwd": _git_commit(Path.cwd())},
        "hardware": hardware(),
        "world_size": world_size,
        "command": sys.argv,
    }


def write_json_atomic(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2))
