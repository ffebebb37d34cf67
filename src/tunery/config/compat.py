"""Keys of the common YAML trainers' configs that Tunery has no field for: accepted where they ask for nothing.

Such configs carry keys like `xformers_attention:` or `deepspeed:` with no value, and optimizer names
like `paged_adamw_32bit`. `normalize` runs on the raw mapping before validation:

- a top-level key written with no value (`fp16:`) means "not set" when its field does not take null;
- each key below is dropped when its value asks for nothing Tunery lacks, and is a clear problem
  otherwise (never silently ignored);
- optimizer aliases become the optimizer that runs (the run's resolved config shows that one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError


def _off(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == "" or v == []


# key -> (accepted value?, what to do instead when it is not)
FOREIGN: dict[str, tuple[Callable[[Any], bool], str]] = {
    "flash_attention": (lambda v: True, ""),  # on a GPU Tunery's attention is FlashAttention-style anyway
    "sdp_attention": (lambda v: True, ""),
    "xformers_attention": (_off, "Tunery does not use xformers; attn_implementation picks its attention backend"),
    "deepspeed": (_off, "Tunery shards with PyTorch FSDP2: set fsdp (see docs/distributed.md) and drop deepspeed"),
    "local_rank": (lambda v: True, ""),  # torchrun sets it in the environment
    "lora_fan_in_fan_out": (_off, "only the nn.Linear weight layout (fan_in_fan_out false) is supported"),
    "group_by_length": (_off, "not supported; sample_packing fills rows instead"),
    "debug": (_off, "use `tunery preprocess CONFIG --debug N` to see tokenized rows and their labels"),
    "wandb_watch": (_off, "gradient and parameter histograms are not logged; drop wandb_watch"),
    "wandb_log_model": (_off, "runs are not uploaded; the run directory holds the adapter and checkpoints"),
    "eval_table_size": (_off, "sample generations during eval are not logged; `tunery eval RUN` reports "
                              "exact-match accuracy"),
    "eval_max_new_tokens": (_off, "sample generations during eval are not logged; drop eval_max_new_tokens"),
    "hub_model_id": (_off, "nothing is pushed to a hub; the run directory holds the adapter (PEFT format)"),
    "hub_strategy": (_off, "nothing is pushed to a hub"),
    "hf_use_auth_token": (lambda v: True, ""),  # hub reads use the environment's token when the hub is reachable
    "is_llama_derived_model": (lambda v: True, ""),  # the family is read from config.json
    "is_mistral_derived_model": (lambda v: True, ""),
    "is_qwen_derived_model": (lambda v: True, ""),
    "gptq": (_off, "GPTQ models are not loaded; use load_in_4bit: true with adapter: qlora"),
}

OPTIMIZER_ALIASES = {  # what these names run as
    "adamw_hf": "adamw",
    "paged_adamw_32bit": "adamw",  # paging the states to host memory under pressure: an adapter's are small
    "adamw_torch_4bit": None,
    "adamw_8bit": None,
    "adamw_bnb_8bit": None,
    "paged_adamw_8bit": None,
}


def normalize(data: dict[str, Any], model: type[BaseModel]) -> tuple[dict[str, Any], list[str]]:
    """The raw mapping with the keys above resolved, and the problems they raise (one line each)."""
    out, problems = {}, []
    for key, value in data.items():
        if key in FOREIGN:
            ok, instead = FOREIGN[key]
            if not ok(value):
                problems.append(f"{key}: {value!r} is not supported: {instead}")
            continue
        if value is None and key in model.model_fields and not _takes_null(model, key):
            continue  # `fp16:` with no value: the default
        if key == "optimizer" and value in OPTIMIZER_ALIASES:
            runs_as = OPTIMIZER_ALIASES[value]
            if runs_as is None:
                problems.append(f"optimizer: {value} is not available (optimizer states in 8 or 4 bits): use "
                                "adamw; a LoRA adapter's states are small (8 bytes per trainable parameter)")
                continue
            value = runs_as
        out[key] = value
    return out, problems


def _takes_null(model: type[BaseModel], key: str) -> bool:
    try:
        TypeAdapter(model.model_fields[key].annotation).validate_python(None)
    except ValidationError:
        return False
    return True
