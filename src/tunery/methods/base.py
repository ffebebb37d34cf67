"""What every training method provides: how a batch becomes a loss."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn as nn


class Method(Protocol):
    name: str
    data_kind: str  # which PreparedData.kind it trains on

    def count(self, batch: dict[str, Any]) -> int:
        """Units this micro-batch adds to the step's normaliser (trained tokens for SFT, pairs for DPO)."""

    def loss(self, model: nn.Module, batch: dict[str, Any], normalizer: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the micro-batch already divided by the whole accumulated step's normaliser,
        so summing micro-batch losses gives the step loss (not a mean of means)."""
