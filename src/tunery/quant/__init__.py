"""Quantized storage of frozen base weights: NF4 (QLoRA), double quantization, streaming loading."""

from .embedding import CPUEmbedding, offload_embedding
from .loading import init_quantized_random, load_quantized, materialize
from .nf4 import (
    NF4_CODE_VALUES,
    NF4Linear,
    NF4Weight,
    dequantize_nf4,
    dequantize_nf4_reference,
    quantize_model,
    quantize_nf4,
    quantized_bytes,
)

__all__ = ["NF4_CODE_VALUES", "CPUEmbedding", "NF4Linear", "NF4Weight", "dequantize_nf4", "dequantize_nf4_reference",
           "init_quantized_random", "load_quantized", "materialize", "offload_embedding", "quantize_model",
           "quantize_nf4", "quantized_bytes"]
