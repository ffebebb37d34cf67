"""Typed values that flow out of the data pipeline (the contract between data/, methods/ and train/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE = -100


@dataclass
class PreparedData:
    """Tokenized, masked rows ready for batching (what `prepare_data` returns).

    SFT rows (kind "sft"): {"input_ids", "labels", "position_ids"}: lists of one length, labels aligned to
    input_ids (labels[i] == input_ids[i] where trained, -100 elsewhere; the loss shifts). With
    sample_packing a row holds several documents and position_ids restart at 0 at each one (that is
    where the document boundaries are); without it a row is one document, position_ids 0..n-1.
    Preference rows: {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    (one pair; both share the prompt's tokens; only the responses are labelled).
    KTO rows: {"input_ids", "labels", "kto_label": bool, "prompt_len": int} (prompt_len = number of prompt
    tokens, i.e. the index of the first completion token).
    PRM rows: {"input_ids", "labels", "position_ids"} (packed like SFT) where labels are NOT token ids:
    1 (step right) or 0 (step wrong) on the last token of each step's separator, -100 elsewhere; they
    are classification targets read at that very position (not shifted).
    Prompt rows (GRPO, kind "prompts"): {"prompt_ids": list[int], "columns": dict} (the prompt rendered
    with the chat template and its generation prompt; every other column of the source row).
    stats: examples, tokens, trained_tokens, dropped (+ dropped_too_long, dropped_no_trained_tokens),
    truncated, skipped, rows, packing_efficiency, rows_read, cache ("built"/"hit"), cache_path, seconds,
    and "eval" with the same counts for the eval split.
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None
    stats: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of every source file
    kind: str = "sft"  # sft | preference | kto | prm | prompts
