"""KV-cache generation and sampling, used by chat, eval, serve and GRPO."""

from .engine import Completion, GenerationStats, Generator, engine_for, generate
from .sampling import BatchSampler, SamplingParams
from .stops import END_OF_TURN, stop_token_ids
from .streaming import TextStream

__all__ = ["END_OF_TURN", "BatchSampler", "Completion", "GenerationStats", "Generator", "SamplingParams",
           "TextStream", "engine_for", "generate", "stop_token_ids"]
