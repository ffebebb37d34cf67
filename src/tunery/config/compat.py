"""Keys of the common YAML trainers' configs that Tunery has no field for: accepted where they ask for nothing.

Such configs carry keys like `xformers_attention:` or `deepspeed:` with no value, and optimizer names
like `paged_adamw_32bit`. `normalize` runs on the raw mapping before validation:

- a top-level key written with no value (`fp16:`) means "not set" when its field does not take null;
- each key in FOREIGN is dropped when its value asks for nothing Tunery lacks, and is a clear problem
  otherwise (never silently ignored);
- each key in MAPPED becomes the Tunery key(s) it stands for (`dataset_processes` is dataset_num_proc), and
  a dataset entry's message_field_role / message_field_content become its message_property_mappings;
- optimizer aliases become the optimizer that runs (the run's resolved config shows that one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError


def _off(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == "" or v == []


def _any(v: Any) -> bool:
    return True


# key -> (accepted value?, what to do instead when it is not)
FOREIGN: dict[str, tuple[Callable[[Any], bool], str]] = {
    "flash_attention": (_any, ""),  # on a GPU Tunery's attention is FlashAttention-style anyway
    "sdp_attention": (_any, ""),
    "xformers_attention": (_off, "Tunery does not use xformers; attn_implementation picks its attention backend"),
    "deepspeed": (_off, "Tunery shards with PyTorch FSDP2: set fsdp (see docs/distributed.md) and drop deepspeed"),
    "local_rank": (_any, ""),  # torchrun sets it in the environment
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
    "hf_use_auth_token": (_any, ""),  # hub reads use the environment's token when the hub is reachable
    "is_llama_derived_model": (_any, ""),  # the family is read from config.json
    "is_mistral_derived_model": (_any, ""),
    "is_qwen_derived_model": (_any, ""),
    "gptq": (_off, "GPTQ models are not loaded; use load_in_4bit: true with adapter: qlora"),
    # packing estimates and data-loader / HF Trainer knobs: Tunery packs exactly and loads its own batches
    "eval_sample_packing": (_any, ""),
    "sample_packing_eff_est": (_any, ""),
    "sample_packing_group_size": (_any, ""),
    "max_packed_sequence_len": (_any, ""),
    "total_num_tokens": (_any, ""),
    "dataloader_num_workers": (_any, ""),
    "dataloader_pin_memory": (_any, ""),
    "dataloader_prefetch_factor": (_any, ""),
    "remove_unused_columns": (_any, ""),
    "include_tokens_per_second": (_any, ""),  # tokens/s is in every metrics row
    "low_cpu_mem_usage": (_any, ""),
    "torch_compile_backend": (_any, ""),  # torch_compile: true uses inductor
    "gradient_checkpointing_kwargs": (_any, ""),  # Tunery's checkpointing picks its own (gradient_checkpointing)
    # fused-kernel plugins: Tunery's own kernels fuse RMSNorm, RoPE, SwiGLU and the linear cross-entropy
    "plugins": (_any, ""),
    "liger_rope": (_any, ""),
    "liger_rms_norm": (_any, ""),
    "liger_glu_activation": (_any, ""),
    "liger_layer_norm": (_any, ""),
    "liger_fused_linear_cross_entropy": (_any, ""),
    "save_safetensors": (lambda v: v is None or v is True, "weights are always written as safetensors"),
    "bnb_4bit_quant_type": (lambda v: v in (None, "nf4"), "the 4-bit format is NF4 (load_in_4bit)"),
    "bnb_4bit_compute_dtype": (lambda v: v in (None, "bfloat16", "bf16"),
                               "the compute dtype follows bf16 / fp16: drop bnb_4bit_compute_dtype"),
    "neftune_noise_alpha": (_off, "NEFTune embedding noise is not implemented"),
    "lr_quadratic_warmup": (_off, "warmup is linear"),
    "lr_scheduler_kwargs": (_off, "the schedules take cosine_min_lr_ratio, warmup_steps and warmup_ratio"),
    "save_only_model": (_off, "checkpoints keep the optimizer state, for exact resume"),
    "unfrozen_parameters": (_off, "not supported: train every weight (no adapter) or use an adapter"),
    "lora_on_cpu": (_off, "not supported"),
    "relora_steps": (_off, "ReLoRA is not implemented"),
    "resize_token_embeddings_to_32x": (_off, "not supported"),
    "dataset_exact_deduplication": (_off, "rows are not deduplicated; deduplicate the data first"),
    "fix_untrained_tokens": (_off, "not supported"),
    "embeddings_skip_upcast": (_any, ""),
    "eval_causal_lm_metrics": (_off, "`tunery eval RUN` reports loss, perplexity and exact-match accuracy"),
    "do_causal_lm_eval": (_off, "`tunery eval RUN` reports loss, perplexity and exact-match accuracy"),
}

# key -> the Tunery keys its value stands for (a key the config sets itself wins)
MAPPED: dict[str, Callable[[Any], dict[str, Any]]] = {
    "dataset_processes": lambda v: {"dataset_num_proc": v} if v else {},
    "auto_resume_from_checkpoints": lambda v: {"resume_from_checkpoint": "auto"} if v else {},
    "save_strategy": lambda v: {"saves_per_epoch": 1} if v == "epoch" else {},
    "eval_strategy": lambda v: {"evals_per_epoch": 1} if v == "epoch" else {},
    "evaluation_strategy": lambda v: {"evals_per_epoch": 1} if v == "epoch" else {},
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
    implied: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        if key in MAPPED:
            implied.update({k: (v, key) for k, v in MAPPED[key](value).items()})
            continue
        if key in FOREIGN:
            ok, instead = FOREIGN[key]
            if not ok(value):
                problems.append(f"{key}: {value!r} is not supported: {instead}")
            continue
        if value is None and key in model.model_fields and not _takes_null(model, key):
            continue  # `fp16:` with no value: the default
        if key in ("datasets", "test_datasets") and isinstance(value, list):
            value = [_entry(e) for e in value]
        if key == "optimizer" and value in OPTIMIZER_ALIASES:
            runs_as = OPTIMIZER_ALIASES[value]
            if runs_as is None:
                problems.append(f"optimizer: {value} is not available (optimizer states in 8 or 4 bits): use "
                                "adamw; a LoRA adapter's states are small (8 bytes per trainable parameter)")
                continue
            value = runs_as
        out[key] = value
    for key, (value, source) in implied.items():
        rival = {"saves_per_epoch": "save_steps", "evals_per_epoch": "eval_steps"}.get(key)
        if rival and data.get(rival) is not None:
            problems.append(f"{source}: {data[source]} and {rival} are both set; set only one")
        else:
            out.setdefault(key, value)
    return out, problems


# older dataset-entry keys for chat rows: the message's role and content fields
ENTRY_MAPPED = {"message_field_role": "role", "message_field_content": "content"}


def _entry(e: Any) -> Any:
    """A dataset entry with message_field_role / message_field_content folded into message_property_mappings
    (an explicit mapping wins)."""
    if not isinstance(e, dict) or not ENTRY_MAPPED.keys() & e.keys():
        return e
    e = dict(e)
    mapping = {prop: e.pop(key) for key, prop in ENTRY_MAPPED.items() if e.get(key) is not None}
    for key in ENTRY_MAPPED:
        e.pop(key, None)
    e["message_property_mappings"] = {**mapping, **(e.get("message_property_mappings") or {})}
    return e


def _takes_null(model: type[BaseModel], key: str) -> bool:
    try:
        TypeAdapter(model.model_fields[key].annotation).validate_python(None)
    except ValidationError:
        return False
    return True
