"""Sampling settings and the vectorized next-token choice: every row of a batch has its own settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one completion is drawn. `temperature == 0` is greedy; top_k 0 and top_p 1 switch those off."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the completion
    stop_token_ids: list[int] | None = None  # extra stop tokens on top of the model's end-of-turn tokens
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (got {self.top_k})")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class BatchSampler:
    """Per-row sampling settings as tensors; `__call__(logits, seen)` picks one token per row.

    Built once per batch so the decode loop does no Python work per row. Steps that no row needs
    (penalty, top-k, top-p, sampling at all) are skipped for the whole batch.
    """

    def __init__(self, params: list[SamplingParams], vocab_size: int, device: torch.device,
                 generator: torch.Generator | None = None):
        self.device = device
        self.generator = generator
        self.all_greedy = all(p.greedy for p in params)
        self.greedy = torch.tensor([p.greedy for p in params], device=device)
        self.temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                                        device=device, dtype=torch.float32)[:, None]
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device,
                                    dtype=torch.float32)[:, None]
        self.use_penalty = any(p.repetition_penalty != 1.0 for p in params)
        sampled = [p for p in params if not p.greedy]
        self.use_top_k = any(0 < p.top_k < vocab_size for p in sampled)
        self.use_top_p = any(p.top_p < 1.0 for p in sampled)
        self.top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params],
                                  device=device, dtype=torch.long)[:, None]
        self.top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32)[:, None]

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] (float32) -> token ids [B]. `seen` [B, V] bool marks tokens the penalty applies to."""
        if self.use_penalty and seen is not None:
            penalized = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(seen, penalized, logits)
        if self.all_greedy:
            return logits.argmax(-1)
        scaled = logits / self.temperature
        if self.use_top_k or self.use_top_p:
            sorted_logits, order = scaled.sort(-1, descending=True)
            drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if self.use_top_k:
                ranks = torch.arange(sorted_logits.shape[-1], device=logits.device)[None, :]
                drop |= ranks >= self.top_k
            if self.use_top_p:
                probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
                before = probs.cumsum(-1) - probs  # mass of the tokens ranked above this one
                drop |= before >= self.top_p  # keeps the smallest prefix whose mass reaches top_p (>= 1 token)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
        # exponential race (Gumbel-max in another form): argmax p / E with E ~ Exp(1) draws from p, and is one
        # fused pass instead of multinomial's per-row CPU work
        probs = scaled.softmax(-1)
        race = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        sampled = (probs / race).argmax(-1)
        return torch.where(self.greedy, logits.argmax(-1), sampled)
