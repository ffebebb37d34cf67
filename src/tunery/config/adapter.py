"""Adapter settings: LoRA, QLoRA, DoRA, rsLoRA, which modules."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class AdapterSection(Section):
    adapter: Literal["lora", "qlora"] | None = Field(None, description="lora, qlora, or absent for full fine-tuning.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scale numerator: scale = alpha / r (or alpha / sqrt(r) with rsLoRA).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | None = Field(None, description="Module names to adapt, e.g. [q_proj, v_proj].")
    lora_target_linear: bool = Field(False, description="Adapt every linear layer of the decoder blocks.")
    lora_modules_to_save: list[str] | None = Field(None, description="Modules trained fully and saved with the adapter, e.g. [lm_head, embed_tokens].")
    peft_use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling alpha / sqrt(r).")
    peft_use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA, peft's use_dora): a trained "
                                "magnitude per output row; saved in peft's format. Runs the plain PyTorch path "
                                "(no fused LoRA kernels), so it is slower than LoRA.")
    lora_model_dir: str | None = Field(None, description="Start from an existing PEFT adapter folder.")
