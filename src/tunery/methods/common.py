"""Shared batch helpers for the methods: label shifting across document boundaries."""

from __future__ import annotations

from typing import Any

import torch


def shifted_labels(batch: dict[str, Any]) -> torch.Tensor:
    """labels[t] becomes the target predicted at t: labels shifted left by one, -100 at each document's end.

    Rows are flat streams of documents, so the last token of a document must not predict the first
    token of the next one.
    """
    labels = batch["labels"]
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    pos = batch["position_ids"]
    next_is_start = torch.zeros_like(labels, dtype=torch.bool)
    next_is_start[:, :-1] = pos[:, 1:] == 0
    return out.masked_fill(next_is_start, -100)
