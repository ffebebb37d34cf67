"""Shared batch helpers for the methods: label shifting across document boundaries."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import host_copy, with_host_copy


def shifted_labels(batch: dict[str, Any]) -> torch.Tensor:
    """labels[t] becomes the target predicted at t: labels shifted left by one, -100 at each document's end.

    Rows are flat streams of documents, so the last token of a document must not predict the first
    token of the next one.
    """
    out = _shift(batch["labels"], batch["position_ids"])
    host_labels, host_pos = host_copy(batch["labels"]), host_copy(batch["position_ids"])
    if host_labels is not None and host_pos is not None:  # the same on the host, for the loss to read
        with_host_copy(out, _shift(host_labels, host_pos))
    return out


def _shift(labels: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    next_is_start = torch.zeros_like(labels, dtype=torch.bool)
    next_is_start[:, :-1] = pos[:, 1:] == 0
    return out.masked_fill(next_is_start, -100)
