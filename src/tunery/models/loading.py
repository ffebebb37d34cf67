"""Build the model for a config: own decoder for supported families, transformers otherwise."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .decoder import CausalLM
from .registry import decoder_config, supports
from .source import resolve_model_path


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    path: Path
    hf_config: Any
    own: bool


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of an HF folder, sharded (index json) or not; adapters excluded."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors")) if not p.name.startswith("adapter")]
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights found (pytorch .bin files are not loaded: "
                                "they can run code when unpickled)")
    return [folder / f for f in files]


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All safetensors weights of an HF folder (sharded or not)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        state.update(load_file(str(f)))
    return state


def build_own(hf_config: Any, dtype: torch.dtype, device: str | torch.device = "cpu",
              state: dict[str, torch.Tensor] | None = None) -> CausalLM:
    """Construct the decoder; with `state`, load it (strict, HF names)."""
    cfg = decoder_config(hf_config)
    with torch.device("meta"):
        model = CausalLM(cfg)
    if state is None:
        model = model.to_empty(device=device)
        _init_weights(model)
    else:
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
        unexpected = [u for u in unexpected if "rotary_emb" not in u]
        if missing or unexpected:
            raise ValueError(f"weights do not match the {cfg.family} architecture: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.tie_weights()
    _reset_buffers(model)
    return model.to(device=device, dtype=dtype)


def _reset_buffers(model: CausalLM) -> None:
    """Buffers computed in __init__ (rope frequencies) are lost on the meta device: recompute them."""
    from ..kernels.rope import rope_inv_freq

    cfg = model.cfg
    inv, _ = rope_inv_freq(cfg.head_dim, cfg.rope, cfg.max_position_embeddings)
    model.model.inv_freq = inv
    if cfg.local_rope is not None:
        model.model.inv_freq_local = rope_inv_freq(cfg.head_dim, cfg.local_rope, cfg.max_position_embeddings)[0]


def _init_weights(model: CausalLM, std: float = 0.02) -> None:
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(0.0 if model.cfg.norm_offset else 1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)


def load_model(base_model: str | None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               own_decoder: bool = True, tokenizer_path: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    from transformers import AutoConfig

    path = resolve_model_path(base_model)
    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(tokenizer_path or path)
    if own_decoder and supports(hf_config):
        model = build_own(hf_config, dtype, device, read_state_dict(path))
        return LoadedModel(model, tokenizer, path, hf_config, True)
    from transformers import AutoModelForCausalLM

    from .hf_fallback import HFCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                              use_safetensors=True).to(device)
    return LoadedModel(HFCausalLM(hf), tokenizer, path, hf_config, False)
