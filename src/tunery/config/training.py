"""Optimizer, schedule, batch sizes, precision, evaluation, checkpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import Section


class TrainingSection(Section):
    output_dir: str = Field("./outputs/run", description="Run directory.")
    seed: int = Field(42, description="Seed for data order, init and dropout.")
    micro_batch_size: int = Field(1, ge=1, description="Rows (or packed rows) per forward pass.")
    gradient_accumulation_steps: int | None = Field(None, ge=1, description="Micro-batches per optimizer step.")
    batch_size: int | None = Field(None, ge=1, description="Rows per optimizer step per process; sets accumulation.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the data (used when max_steps is absent).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides num_epochs.")
    learning_rate: float = Field(2e-4, gt=0)
    optimizer: Literal["adamw", "adamw_torch", "adamw_torch_fused", "sgd"] = Field(
        "adamw", description="adamw (fused on a GPU), adamw_torch (the single-tensor loop), adamw_torch_fused, sgd. "
        "adamw_hf and paged_adamw_32bit are read as adamw.")
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = Field(0.0, ge=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0.0, le=1.0)
    cosine_min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(1.0, description="Clip the global gradient norm; null disables.")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 autocast/weights; auto = on a GPU that has it.")
    fp16: bool = False
    tf32: bool = False
    gradient_checkpointing: bool | Literal["offload"] = Field(False, description="Recompute activations; offload keeps them in CPU memory.")
    offload_strategy: Literal["inputs", "activations", "auto"] = Field(
        "inputs", description="With gradient_checkpointing: offload, what goes to CPU memory: each block's input "
        "(the block is recomputed in backward), or every activation a block saves (nothing recomputed but the "
        "MLP's gate/up; ~4.5x the host traffic; fastest for wide models at moderate lengths), or auto.")
    offload_keep_on_gpu: int = Field(0, ge=0, description="With offload: the last N blocks keep theirs on the GPU "
                                     "(fewer host copies); `tunery plan` says how many fit.")
    offload_save_mlp: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="With offload_strategy activations: how many offloaded blocks also send the MLP's "
        "gate/up to CPU memory instead of recomputing them in backward (less compute, more PCIe traffic); auto "
        "measures the copy time three forwards leave unused on the GPU and fills the shortest one's.")
    offload_save_mlp_kept: int = Field(1, ge=0, description="With offload_strategy activations and "
        "offload_keep_on_gpu: the last N kept blocks keep the MLP's gate/up on the GPU instead of recomputing "
        "them in backward (2 x intermediate x tokens x 2 bytes each; the very last block's cost nothing at "
        "the backward peak); `tunery plan` says how many fit.")
    offload_weights: int = Field(0, ge=0, description="With gradient_checkpointing: offload and load_in_4bit: the "
        "first N offloaded decoder blocks keep their frozen 4-bit weights in CPU memory; each block's are copied "
        "in (a block ahead, into two fixed GPU slots) for its forward and its backward only. Frees (N - 2) x the "
        "4-bit size of a block (112 MB for an 8B model) for twice N blocks of host-to-device copies per step, "
        "which share PCIe with the offloaded activations: on an H200, 8B at 2 x 2048 tokens, N=32 with "
        "offload_keep_on_gpu: 0 took the peak from 6.66 to 2.92 GiB at ~6% fewer tokens/s. `tunery plan` "
        "counts it.")
    offload_weights_mode: Literal["stream", "gap", "lend"] = Field("stream", description="How offload_weights moves them. "
        "stream: as above (the least GPU memory). gap: the first N blocks' 4-bit weights leave the GPU after "
        "their forward and come back during the kept blocks' backward, staying through the next forward; "
        "they are off the GPU where the step peaks (the loss, the start of the backward), which leaves room "
        "for more kept blocks and gate/up (offload_keep_on_gpu, offload_save_mlp_kept): on an H200, 8B at "
        "2 x 2048 tokens under 7 GiB, N=24 with 10-11 kept blocks all keeping gate/up ran 5-8% more tokens/s "
        "than the same budget without it in paired runs, and 2-8% less on machines where its forward then "
        "waited on the CPU (the saved recompute makes the GPU's share of a step smaller). Host-to-device "
        "copies: N blocks' weights once per step. lend (offload_strategy activations, SFT): the first N blocks' "
        "4-bit weights stay on the GPU, and between a block's forward and its backward their memory holds later "
        "blocks' gate/up (no recompute for those blocks; no extra GPU memory), copied back from a host copy in "
        "the backward; works with cuda_graph. It trades compute for host-to-device copies in the backward: on "
        "an H200, 8B at 2 x 2048 tokens, 13 blocks kept gate/up and the step ran +0-1% (the copies back then "
        "fill PCIe); a GPU with a faster host link gains more.")
    cuda_graph: bool = Field(False, description="On one GPU (SFT): after the first steps, capture the whole "
        "optimizer step (every micro-batch's forward and backward, clipping, the optimizer) as one CUDA graph "
        "and replay it, so the CPU no longer launches ~100 kernels per decoder block. Pays off where the step "
        "waits on the CPU: 8B QLoRA on an H200 with a slower host CPU ran 13.8k tokens/s against 11.8-12.1k "
        "eagerly (benchmarks/RESULTS.md). Each micro-batch is padded to micro_batch_size x sequence_len tokens "
        "(use sample_packing, or short rows pay for the padding). Needs gradient_checkpointing false, true, or "
        "offload with offload_strategy activations, and no offload_weights (but offload_weights_mode: lend); a "
        "step that cannot be replayed runs eagerly.")
    loss_watchdog_threshold: float | None = Field(None, gt=0, description="End the run as failed when the "
        "training loss stays above this (or is not finite) for loss_watchdog_patience steps in a row: a run that "
        "has diverged stops early instead of wasting the GPU; checkpoints already written stay.")
    loss_watchdog_patience: int = Field(3, ge=1, description="Steps in a row over loss_watchdog_threshold.")
    eval_steps: int | None = Field(None, ge=1, description="Eval every N steps (default: at the end only).")
    evals_per_epoch: int | None = Field(None, ge=1, description="Eval N times per epoch, evenly (instead of eval_steps).")
    early_stopping_patience: int | None = Field(None, ge=1, description="End the run when eval_loss has not improved "
        "for N evals in a row (needs eval data and eval_steps or evals_per_epoch); it ends as completed, with the "
        "final eval and adapter written as usual.")
    eval_batch_size: int | None = None
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps.")
    saves_per_epoch: int | None = Field(None, ge=1, description="Checkpoint N times per epoch, evenly (instead of save_steps).")
    save_total_limit: int | None = Field(None, ge=1, description="Keep at most N checkpoints.")
    resume_from_checkpoint: str | None = Field(None, description="auto (latest in output_dir) or a checkpoint path.")
    logging_steps: int = Field(1, ge=1)
    deterministic: bool = Field(False, description="Deterministic algorithms (for bitwise-exact resume).")
    save_merged: bool = Field(False, description="Adapter runs: also write the merged model (adapter folded into "
                              "the base, as `tunery merge RUN`) to RUN/merged at the end.")
