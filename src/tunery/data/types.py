"""Typed values that flow out of the data pipeline (the contract between data/, methods/ and train/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE = -100


@dataclass
class PreparedData:
    """Tokenized, masked rows ready for batching.

    SFT rows: {"input_ids": list[int], "labels": list[int]} with labels aligned to input_ids
    (labels[i] == input_ids[i] where trained, -100 elsewhere; the loss shifts).
    Preference rows: {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}.
    KTO rows: {"input_ids", "labels", "kto_label": bool}. PRM rows: {"input_ids", "labels"} with labels only
    on step-separator tokens (0/1). Prompt rows (GRPO): {"prompt_ids": list[int], "columns": dict}.
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None
    stats: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of every source file
    kind: str = "sft"  # sft | preference | kto | prm | prompts
