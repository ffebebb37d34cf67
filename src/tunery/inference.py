"""Load what a run produced (or any model) for inference, and the `tunery chat` verb.

A target is one of:
  - a run directory: config.yaml (the resolved config) and adapter/ (PEFT) or model/ (HF folder);
  - a checkpoint: RUN/checkpoints/step-N/ holding adapter/ or model/ (the config is RUN/config.yaml);
  - an adapter folder itself (adapter_config.json; the base comes from the config or the adapter);
  - a plain model: an HF folder, a .gguf file, a hub id, or `default` (the embedded SmolLM2).
"""

from __future__ import annotations

import json
import sys
import warnings
from argparse import Namespace
from pathlib import Path
from typing import Any, TextIO

import torch

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)} or auto")
    return _DTYPES[dtype]


def describe_target(target: str | Path) -> dict[str, Any]:
    """What `target` is, without loading weights: kind (adapter | model | base), the folders, the config."""
    t = str(target)
    p = Path(t).expanduser()
    info: dict[str, Any] = {"target": t, "kind": "base", "run_dir": None, "adapter_dir": None, "model_dir": None,
                            "config_path": None, "config": None, "base_model": t}
    if p.is_dir():
        if (p / "adapter").is_dir() or (p / "model").is_dir():
            info["run_dir"] = p if (p / "config.yaml").is_file() else _run_of_checkpoint(p)
            if (p / "adapter").is_dir():
                info["kind"], info["adapter_dir"] = "adapter", p / "adapter"
            else:
                info["kind"], info["model_dir"] = "model", p / "model"
        elif (p / "adapter_config.json").is_file():
            info["kind"], info["adapter_dir"] = "adapter", p
            info["run_dir"] = p.parent if (p.parent / "config.yaml").is_file() else _run_of_checkpoint(p.parent)
        elif (p / "config.yaml").is_file() and not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: a run directory without adapter/ or model/ - has the run finished? "
                                    "(pass a checkpoint, RUN/checkpoints/step-N, to use an unfinished run)")
    run_dir = info["run_dir"]
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        info["config_path"] = run_dir / "config.yaml"
        info["config"] = _read_run_config(run_dir / "config.yaml")
    if info["kind"] == "adapter":
        info["base_model"] = _base_model_of(info)
    elif info["kind"] == "model":
        info["base_model"] = str(info["model_dir"])
    return info


def _run_of_checkpoint(folder: Path) -> Path | None:
    """RUN for RUN/checkpoints/step-N (or None)."""
    if folder.parent.name == "checkpoints" and (folder.parent.parent / "config.yaml").is_file():
        return folder.parent.parent
    return None


def _read_run_config(path: Path) -> Any:
    """The validated Config when it still validates, else the raw mapping (older runs)."""
    from .config import ConfigError, load_config, read_yaml

    try:
        return load_config(path)
    except ConfigError as e:
        warnings.warn(f"{path} does not validate against this version's schema ({e.problems[:2]}); "
                      "reading its keys as they are", stacklevel=3)
        return read_yaml(path)


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _base_model_of(info: dict[str, Any]) -> str:
    base = cfg_get(info["config"], "base_model")
    if base is None:
        acfg = json.loads((info["adapter_dir"] / "adapter_config.json").read_text())
        base = acfg.get("base_model_name_or_path") or "default"
    return _resolve_relative(str(base), info.get("config_path"))


def _resolve_relative(path: str, config_path: Path | None) -> str:
    """A relative base_model in a run's config is tried as given, then beside the run."""
    p = Path(path).expanduser()
    if path in ("default", "") or p.is_absolute() or p.exists() or config_path is None:
        return path
    for root in (config_path.parent, config_path.parent.parent):
        if (root / p).exists():
            return str(root / p)
    return path


def load_for_inference(target: str | Path, device: str | torch.device | None = None,
                       dtype: str | torch.dtype | None = None) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, info). LoRA adapters stay unmerged (LoRALinear), so what runs is
    exactly what was trained; `export.merge_run` folds them in. info: kind, run_dir, adapter_dir,
    model_dir, base_model, config, path (the base's folder), description."""
    from .models import load_model, load_tokenizer

    info = describe_target(target)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = info["config"]
    own = bool(cfg_get(cfg, "own_decoder", True))
    trust = bool(cfg_get(cfg, "trust_remote_code", False))
    tok_path = cfg_get(cfg, "tokenizer_config")
    if info["kind"] == "model":
        lm = load_model(str(info["model_dir"]), dt, "cpu", own_decoder=own, trust_remote_code=trust)
    else:
        lm = load_model(info["base_model"], dt, "cpu", own_decoder=own, tokenizer_path=tok_path,
                        trust_remote_code=trust)
    model, tokenizer = lm.model, lm.tokenizer
    if info["kind"] == "adapter":
        from .adapters import load_adapter

        adir: Path = info["adapter_dir"]
        load_adapter(model, adir)
        if (adir / "tokenizer_config.json").is_file():  # the run's tokenizer (its chat template) wins
            tokenizer = load_tokenizer(adir)
        if cfg_get(cfg, "load_in_4bit", False):
            _quantize_like_training(model, cfg, dt, dev)
    _apply_special_tokens(tokenizer, cfg_get(cfg, "special_tokens"))
    model.to(dev)
    model.eval()
    info.update(path=lm.path, own=lm.own, hf_config=lm.hf_config, device=dev, dtype=dt)
    info["description"] = _describe(info)
    return model, tokenizer, info


def _quantize_like_training(model: torch.nn.Module, cfg: Any, dtype: torch.dtype, device: torch.device) -> None:
    """A QLoRA adapter learned against the NF4-rounded base: round the base the same way (when the quant
    module can run here), so outputs and merges match the trained model."""
    try:
        from .quant import quantize_model
    except ImportError:
        warnings.warn("this run trained on a 4-bit base but the quant module is unavailable; using the "
                      "full-precision base (outputs differ slightly from training)", stacklevel=3)
        return
    try:
        model.to(device)
        quantize_model(model, compute_dtype=dtype, double_quant=bool(cfg_get(cfg, "bnb_4bit_use_double_quant", False)))
    except Exception as e:
        warnings.warn(f"could not quantize the base like training did ({type(e).__name__}: {e}); using the "
                      "full-precision base", stacklevel=3)


def _apply_special_tokens(tokenizer: Any, special: dict[str, str] | None) -> None:
    for k, v in (special or {}).items():
        try:
            setattr(tokenizer, k, v)
        except Exception:
            pass


def _describe(info: dict[str, Any]) -> str:
    if info["kind"] == "adapter":
        return f"{info['base_model']} + adapter {info['adapter_dir']}"
    if info["kind"] == "model":
        return str(info["model_dir"])
    return str(info["path"])


def chat_main(target: str | Namespace, prompt: str | None = None, system: str | None = None, temperature: float = 0.7,
              top_p: float = 0.9, top_k: int = 0, repetition_penalty: float = 1.0, max_new_tokens: int = 512,
              seed: int | None = None, device: str | None = None, dtype: str | None = None,
              stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """`tunery chat TARGET`: with `prompt`, answer once and exit; otherwise an interactive multi-turn chat
    that streams each reply as it is generated. /reset clears the history; /exit or Ctrl-D quits.
    `target` may also be the CLI's argparse namespace (fields named like the keywords)."""
    if isinstance(target, Namespace):
        ns = target
        target = ns.target
        prompt, system = getattr(ns, "prompt", prompt), getattr(ns, "system", system)
        temperature, top_p = getattr(ns, "temperature", temperature), getattr(ns, "top_p", top_p)
        top_k, repetition_penalty = getattr(ns, "top_k", top_k), getattr(ns, "repetition_penalty", repetition_penalty)
        max_new_tokens, seed = getattr(ns, "max_new_tokens", max_new_tokens), getattr(ns, "seed", seed)
        device, dtype = getattr(ns, "device", device), getattr(ns, "dtype", dtype)
    from .generate import SamplingParams
    from .generate.chat import ChatSession

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    model, tokenizer, info = load_for_inference(target, device=device, dtype=dtype)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty)
    session = ChatSession(model, tokenizer, system=system, params=params)
    if seed is not None:
        torch.manual_seed(seed)
        session.seed = seed

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    if prompt is not None:
        session.send(prompt, write)
        write("\n")
        return 0
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    if interactive:
        write(f"chatting with {info['description']} - /reset clears the history, /exit quits\n")
    while True:
        if interactive:
            write("\n>>> ")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        try:
            session.send(text, write)
        except KeyboardInterrupt:
            write("\n(interrupted)")
        write("\n")
    return 0


__all__ = ["chat_main", "describe_target", "load_for_inference", "resolve_device", "resolve_dtype"]
