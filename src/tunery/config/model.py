"""Which model to load and how: path or id, dtype, quantization, kernels."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class ModelSection(Section):
    base_model: str = Field(
        "default",
        description="Local HF folder, a .gguf file, a hub id (only when the hub is reachable), "
        "or `default` for the embedded SmolLM2-135M-Instruct.",
    )
    base_model_config: str | None = Field(None, description="Folder holding config.json if not base_model.")
    model_type: str | None = Field(None, description="Architecture class name, e.g. LlamaForCausalLM (informational; detected from config.json).")
    tokenizer_type: str | None = Field(None, description="Tokenizer class name (AutoTokenizer is always used).")
    tokenizer_config: str | None = Field(None, description="Path of the tokenizer if it differs from base_model.")
    trust_remote_code: bool = Field(False, description="Allow custom code from the model folder (transformers fallback only).")
    load_in_4bit: bool = Field(False, description="Store frozen base linear weights in NF4 (QLoRA).")
    load_in_8bit: bool = Field(False, description="Store frozen base linear weights in int8.")
    bnb_4bit_use_double_quant: bool = Field(False, description="Quantize the NF4 absmax scales again (saves ~0.4 bit/param).")
    kernels: bool = Field(True, description="Use the fused Triton kernels on a CUDA GPU; false forces plain PyTorch.")
    torch_compile: bool = Field(False, description="torch.compile each decoder block.")
    attn_implementation: Literal["auto", "varlen", "flex", "sdpa", "eager"] = Field(
        "auto", description="Attention backend; auto picks cuDNN SDPA (one document per row) or varlen/flex on GPU, SDPA on CPU."
    )
    own_decoder: bool = Field(True, description="Use Tunery's decoder for supported families; false forces transformers.")
