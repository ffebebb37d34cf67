"""Training method selection and per-method hyperparameters (DPO, KTO, ORPO, SimPO, RM, PRM, GRPO)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class GRPOSection(Section):
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (G).")
    max_prompt_length: int = Field(512, ge=1)
    max_completion_length: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    reward_funcs: list[str] = Field(default_factory=lambda: ["gsm8k_answer"], description="Built-in names or module:function paths.")
    reward_weights: list[float] | None = None
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = Field(0.0, ge=0.0, description="KL weight to the reference; 0 needs no reference.")
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = Field(1, ge=1, description="Policy updates per rollout.")
    mask_truncated_completions: bool = False
    format_pattern: str | None = Field(None, description="Regex for the `format` reward.")
    length_target: int | None = Field(None, description="Target length (tokens) for the `length` reward.")


class MethodSection(Section):
    rl: Literal["dpo", "kto", "orpo", "simpo", "rm", "prm", "grpo"] | None = Field(None, description="Method; absent = SFT.")
    rl_beta: float = Field(0.1, gt=0)
    dpo_loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    dpo_label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    rpo_alpha: float | None = Field(None, ge=0.0)
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    orpo_alpha: float = 0.1
    simpo_gamma: float = 0.5
    rm_center_rewards_coefficient: float | None = None
    precompute_ref_log_probs: bool = False
    grpo: GRPOSection = Field(default_factory=GRPOSection)
