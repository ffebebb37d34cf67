"""Model loading: the architecture registry, the own decoder, and the transformers fallback."""

from .decoder import CausalLM, DecoderConfig, KVCache
from .loading import LoadedModel, build_own, load_model, load_tokenizer, read_state_dict
from .source import ModelNotFound, resolve_model_path

__all__ = ["CausalLM", "DecoderConfig", "KVCache", "LoadedModel", "ModelNotFound", "build_own", "load_model",
           "load_tokenizer", "read_state_dict", "resolve_model_path"]
