"""Resolve `base_model` to a local HF folder: embedded default, folder, GGUF file, or reachable hub id."""

from __future__ import annotations

import os
from pathlib import Path

from .embedded import default_model_folder, gguf_to_folder


class ModelNotFound(FileNotFoundError):
    pass


def resolve_model_path(base_model: str | None) -> Path:
    """Return a folder with config.json, weights and tokenizer files."""
    if base_model in (None, "", "default"):
        return default_model_folder()
    p = Path(os.path.expanduser(base_model))
    if p.is_file() and p.suffix == ".gguf":
        return gguf_to_folder(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return gguf_to_folder(ggufs[0])
            raise ModelNotFound(f"base_model {base_model}: folder has no config.json (not an HF model folder)")
        return p
    if p.exists():
        raise ModelNotFound(f"base_model {base_model}: not a model folder or .gguf file")
    looks_local = base_model.startswith((".", "/", "~")) or base_model.count("/") != 1
    if looks_local:
        raise ModelNotFound(f"base_model {base_model}: no such file or folder")
    return _from_hub(base_model)


def _from_hub(repo_id: str) -> Path:
    """Only when the hub is reachable; otherwise say plainly to give a local path."""
    hint = (f"base_model {repo_id!r} looks like a hub id, and the hub cannot be reached from this machine "
            "(or it is not cached). Download it elsewhere and set base_model to the local folder, a .gguf file, "
            "or `default` for the embedded SmolLM2-135M-Instruct.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelNotFound(hint) from e
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFound(hint)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))
    except Exception as e:
        raise ModelNotFound(f"{hint} ({type(e).__name__})") from None
