"""Export: merged safetensors folders, GGUF (f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, f32) and Ollama (GGUF + Modelfile)."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Any

from .gguf_writer import GGUF_ARCH, QUANT_TYPES, check_quant, gguf_from_folder, write_gguf
from .merge import merge_run
from .weights import save_model_folder

FORMATS = ("gguf", "ollama", "safetensors")


def _name_of(info: dict[str, Any], target: str | Path) -> str:
    if info.get("run_dir") is not None:
        return Path(info["run_dir"]).name
    p = Path(str(target))
    return p.stem if p.suffix == ".gguf" else (p.name or "model")


def export_gguf(target: str | Path, out: str | Path | None = None, quant: str = "f16") -> Path:
    """RUN (adapter merged in memory, layer by layer), a checkpoint, or any model of the own decoder's
    families -> one GGUF file. Default `out`: RUN/export/NAME-QUANT.gguf (./NAME-QUANT.gguf for a model)."""
    import torch

    from ..inference import describe_target, load_for_inference
    from ..models import resolve_model_path
    from .gguf_writer import model_tensors
    from .merge import base_dtype
    from .weights import hf_config_dict

    quant = check_quant(quant)
    info = describe_target(target)
    name = _name_of(info, target)
    if out is None:
        root = Path(info["run_dir"]) / "export" if info.get("run_dir") is not None else Path(".")
        out = root / f"{name}-{quant}.gguf"
    if info["kind"] == "model":
        return gguf_from_folder(info["model_dir"], out, quant, name)
    if info["kind"] == "base":
        return gguf_from_folder(resolve_model_path(info["base_model"]), out, quant, name)
    dtype = base_dtype(resolve_model_path(info["base_model"])) or torch.float32
    model, tokenizer, info = load_for_inference(target, device="cpu", dtype=dtype)
    if not info.get("own"):
        raise ValueError(f"GGUF export covers the own decoder's families ({', '.join(GGUF_ARCH)}); this base runs "
                         "through transformers. Export --format safetensors and use llama.cpp's converter.")
    hf_config = hf_config_dict(info["path"], model, dtype)
    with torch.no_grad():
        return write_gguf(model_tensors(model), hf_config, tokenizer, out, quant, name)


def export_ollama(target: str | Path, out: str | Path | None = None, quant: str = "f16") -> Path:
    """A folder with NAME-QUANT.gguf and a Modelfile (`ollama create NAME -f Modelfile` inside it).
    Default `out`: RUN/ollama (./NAME-ollama for a model). Returns the folder."""
    from ..inference import describe_target
    from ..models import load_tokenizer, resolve_model_path
    from .ollama import modelfile

    quant = check_quant(quant)
    info = describe_target(target)
    name = _name_of(info, target)
    if out is None:
        out = Path(info["run_dir"]) / "ollama" if info.get("run_dir") is not None else Path(f"{name}-ollama")
    out = Path(out)
    if out.suffix == ".gguf" or out.name == "Modelfile":
        raise ValueError(f"--out for --format ollama is a folder (it gets the .gguf and a Modelfile), not {out}")
    out.mkdir(parents=True, exist_ok=True)
    if info["kind"] == "adapter" and (Path(info["adapter_dir"]) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(info["adapter_dir"])
    elif info["kind"] == "model":
        tokenizer = load_tokenizer(info["model_dir"])
    else:
        tokenizer = load_tokenizer(resolve_model_path(info["base_model"]))
    text, _ = modelfile(f"{name}-{quant}.gguf", tokenizer)  # fails early if the template cannot be translated
    export_gguf(target, out / f"{name}-{quant}.gguf", quant)
    (out / "Modelfile").write_text(text)
    return out


def export_run(run: str | Path | Namespace, fmt: str = "gguf", quant: str = "f16", out: str | Path | None = None) -> Path:
    """`tunery export RUN --format gguf|ollama|safetensors --quant f16|bf16|q8_0|q6_k|q5_k_m|q4_k_m|f32 [--out PATH]`."""
    if isinstance(run, Namespace):
        ns = run
        run, fmt, quant, out = ns.run, getattr(ns, "format", fmt), getattr(ns, "quant", quant), getattr(ns, "out", out)
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "safetensors":
        return merge_run(run, out)
    if fmt == "ollama":
        return export_ollama(run, out, quant)
    return export_gguf(run, out, quant)


__all__ = ["FORMATS", "GGUF_ARCH", "QUANT_TYPES", "export_gguf", "export_ollama", "export_run", "gguf_from_folder",
           "merge_run", "save_model_folder", "write_gguf"]
