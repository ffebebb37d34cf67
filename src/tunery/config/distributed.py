"""Multi-GPU settings in the common style: fsdp list + fsdp_config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class FSDPConfig(Section):
    fsdp_offload_params: bool = False
    fsdp_state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = "SHARDED_STATE_DICT"
    fsdp_transformer_layer_cls_to_wrap: str | None = None
    reshard_after_forward: bool = True
    fsdp_version: int = 2
    fsdp_auto_wrap_policy: str | None = None
    fsdp_sync_module_states: bool | None = None
    fsdp_use_orig_params: bool | None = None
    fsdp_cpu_ram_efficient_loading: bool | None = None
    fsdp_activation_checkpointing: bool | None = None


class DistributedSection(Section):
    fsdp: list[Literal["full_shard", "shard_grad_op", "auto_wrap", "offload", "hybrid_shard"]] | None = None
    fsdp_config: FSDPConfig | None = None
    dp_replicate_size: int | None = Field(None, ge=1, description="HSDP: replicas across machines; shards inside.")
    ddp_timeout: int = Field(1800, ge=1, description="Seconds a rank waits at a collective.")
