"""Supervised fine-tuning: next-token cross-entropy over trained tokens, straight from hidden states."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..kernels.cross_entropy import linear_cross_entropy
from .common import shifted_labels


class SFT:
    name = "sft"
    data_kind = "sft"

    def count(self, batch: dict[str, Any]) -> int:
        return int((shifted_labels(batch) != -100).sum())

    def loss(self, model: nn.Module, batch: dict[str, Any], normalizer: int) -> tuple[torch.Tensor, dict[str, float]]:
        # inputs_embeds: looked up beforehand (a CUDA-graph step reads the CPU-held table outside the graph)
        kw = {"embeds": batch["inputs_embeds"]} if "inputs_embeds" in batch else {}
        hidden = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"], **kw)
        labels = shifted_labels(batch)
        softcap = getattr(getattr(model, "cfg", None), "final_softcap", None)
        total = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.head_weight, labels.reshape(-1),
                                     softcap=softcap)
        # a device tensor under CUDA graphs (the count changes from step to step; the graph reads it there)
        norm = normalizer.clamp(min=1) if isinstance(normalizer, torch.Tensor) else max(normalizer, 1)
        return total / norm, {}
