"""Adapters: LoRA (rsLoRA, DoRA), injection by module name, PEFT-format save/load, merge."""

from .lora import (
    LINEAR_NAMES,
    LoRALinear,
    adapters_disabled,
    inject_lora,
    lora_layers,
    reset_dora_magnitudes,
    target_names,
)
from .peft_format import adapter_state, load_adapter, merge_lora, save_adapter

__all__ = ["LINEAR_NAMES", "LoRALinear", "adapter_state", "adapters_disabled", "inject_lora", "load_adapter",
           "lora_layers", "merge_lora", "reset_dora_magnitudes", "save_adapter", "target_names"]
