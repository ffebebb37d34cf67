"""The whole run config: every section's flat keys in one model, plus cross-field rules."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from .adapter import AdapterSection
from .data import DataSection
from .distributed import DistributedSection
from .logging import LoggingSection
from .methods import MethodSection
from .model import ModelSection
from .training import TrainingSection


class Config(
    ModelSection, AdapterSection, DataSection, TrainingSection, MethodSection, DistributedSection, LoggingSection
):
    """One YAML file describes a run. Keys are flat, in the style of the common YAML trainers."""

    strict: bool | None = Field(None, description="Accepted for compatibility; has no effect.")

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        problems: list[str] = []
        if self.adapter == "qlora" and not self.load_in_4bit:
            problems.append("adapter: qlora needs load_in_4bit: true (or use adapter: lora)")
        if self.load_in_8bit:
            problems.append("load_in_8bit is not supported yet; use load_in_4bit: true with adapter: qlora")
        if self.load_in_4bit and self.load_in_8bit:
            problems.append("load_in_4bit and load_in_8bit are both true; choose one")
        if (self.load_in_4bit or self.load_in_8bit) and self.adapter is None:
            problems.append("load_in_4bit/load_in_8bit freeze a quantized base: set adapter: qlora (or lora)")
        if self.batch_size is not None and self.gradient_accumulation_steps is not None:
            problems.append("batch_size and gradient_accumulation_steps are both set; set only one "
                            "(batch_size = micro_batch_size x gradient_accumulation_steps)")
        if self.batch_size is not None and self.batch_size % self.micro_batch_size:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            problems.append("warmup_steps and warmup_ratio are both set; set only one")
        for steps, per_epoch in (("eval_steps", "evals_per_epoch"), ("save_steps", "saves_per_epoch")):
            if getattr(self, steps) is not None and getattr(self, per_epoch) is not None:
                problems.append(f"{steps} and {per_epoch} are both set; set only one")
        if self.early_stopping_patience is not None:
            if self.rl == "grpo":
                problems.append("early_stopping_patience watches eval_loss, and rl: grpo has none: drop it")
            elif not (self.val_set_size or self.test_datasets):
                problems.append("early_stopping_patience needs eval data: set val_set_size or test_datasets")
            elif not (self.eval_steps or self.evals_per_epoch):
                problems.append("early_stopping_patience needs evals during the run: set eval_steps or evals_per_epoch")
        if self.loss_watchdog_threshold is not None and self.rl == "grpo":
            problems.append("loss_watchdog_threshold watches the training loss of SFT and the preference "
                            "methods; rl: grpo logs rewards: drop it")
        if self.bf16 is True and self.fp16:
            problems.append("bf16 and fp16 are both true; choose one")
        if self.adapter is None and (self.lora_target_modules or self.lora_target_linear):
            problems.append("lora_target_modules/lora_target_linear are set but adapter is absent; set adapter: lora")
        if self.chat_template == "jinja" and not self.chat_template_jinja:
            problems.append("chat_template: jinja needs chat_template_jinja")
        if self.rl == "grpo" and self.grpo.reward_weights is not None and len(self.grpo.reward_weights) != len(self.grpo.reward_funcs):
            problems.append("grpo.reward_weights must have one weight per reward_funcs entry")
        if self.gradient_checkpointing != "offload":  # set away from their defaults, they would do nothing
            unused = [k for k, default in (("offload_strategy", "inputs"), ("offload_keep_on_gpu", 0),
                                           ("offload_save_mlp", "auto"), ("offload_save_mlp_kept", 1))
                      if getattr(self, k) != default]
            if unused:
                problems.append(f"{', '.join(unused)} work with gradient_checkpointing: offload, and "
                                f"gradient_checkpointing is {str(self.gradient_checkpointing).lower()}")
        if self.offload_weights_mode in ("gap", "lend") and not self.offload_weights:
            problems.append(f"offload_weights_mode: {self.offload_weights_mode} moves the first offload_weights blocks' "
                            "4-bit weights, and offload_weights is 0: set offload_weights: N (`tunery plan` counts it)")
        if self.offload_weights_mode == "lend" and self.offload_weights:
            if self.offload_strategy != "activations":
                problems.append("offload_weights_mode: lend keeps gate/up of offload_strategy activations in the "
                                f"weights' memory: set offload_strategy: activations (it is {self.offload_strategy})")
            if self.rl is not None:
                problems.append(f"offload_weights_mode: lend needs each training forward's backward before the next "
                                f"forward, and rl: {self.rl} runs more forwards: use offload_weights_mode: gap")
        if self.offload_weights:
            if self.gradient_checkpointing != "offload" or not self.load_in_4bit:
                problems.append("offload_weights streams the frozen 4-bit weights with the offloaded activations: "
                                "it needs load_in_4bit: true and gradient_checkpointing: offload")
            if self.rl == "grpo" and self.offload_weights_mode == "stream":
                problems.append("offload_weights copies each block's weights in at every forward: not with rl: grpo "
                                "(its rollouts run token by token); offload_weights_mode: gap works there")
            if self.fsdp:
                problems.append("offload_weights is for one GPU; FSDP already shards the weights (fsdp is set)")
        if self.cuda_graph:
            if self.rl is not None:
                problems.append(f"cuda_graph captures SFT steps; rl: {self.rl} runs eagerly: set cuda_graph: false")
            if self.fsdp:
                problems.append("cuda_graph is for one GPU; fsdp is set")
            if self.offload_weights and self.offload_weights_mode != "lend":
                problems.append(f"cuda_graph: offload_weights_mode {self.offload_weights_mode} moves weights with "
                                "host-side waits: set offload_weights: 0, or offload_weights_mode: lend")
            if self.gradient_checkpointing == "offload" and self.offload_strategy != "activations":
                problems.append("cuda_graph with gradient_checkpointing: offload needs offload_strategy: activations "
                                f"(it is {self.offload_strategy})")
        if problems:
            raise ValueError("\n".join(problems))  # one problem a line (messages may hold "; ")
        return self

    @property
    def accumulation_steps(self) -> int:
        if self.gradient_accumulation_steps is not None:
            return self.gradient_accumulation_steps
        if self.batch_size is not None:
            return self.batch_size // self.micro_batch_size
        return 1

    def to_yaml_dict(self) -> dict[str, Any]:
        """Resolved config as plain data, defaults included (what the run dir stores)."""
        return self.model_dump(mode="json")
