"""Datasets, formats, lengths, packing and cache settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import Section


class DatasetEntry(Section):
    path: str = Field(..., description="Local file, folder or glob; or a hub dataset id when the hub is reachable.")
    type: str = Field("alpaca", description="Row format: alpaca, chat_template (messages), sharegpt, completion, "
                      "input_output, preference, kto, prm, prompts, or a user-defined mapping.")
    name: str | None = Field(None, description="Hub dataset config name.")
    split: str | None = Field(None, description="Split to read (default train).")
    data_files: str | list[str] | None = Field(None, description="Files inside a hub dataset or folder.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    ds_type: Literal["json", "jsonl", "parquet", "csv", "arrow"] | None = Field(None, description="Force the file type.")
    # chat_template / sharegpt
    field_messages: str | None = Field(None, description="Column holding the message list.")
    message_property_mappings: dict[str, str] | None = Field(None, description="Map role/content onto the row's own keys.")
    roles_to_train: list[str] | None = Field(None, description="Roles whose turns carry labels (default [assistant]).")
    train_on_eos: Literal["turn", "all", "last", "none"] | None = Field(None, description="Which end-of-turn tokens are trained.")
    chat_template: str | None = Field(None, description="Override the template for this dataset.")
    chat_template_jinja: str | None = Field(None, description="Jinja template when chat_template is jinja.")
    roles: dict[str, list[str]] | None = Field(None, description="Map role names found in the data onto system/user/assistant.")
    # completion / custom
    field: str | None = Field(None, description="Text column for completion rows.")
    field_instruction: str | None = None
    field_input: str | None = None
    field_output: str | None = None
    field_system: str | None = None
    format: str | None = Field(None, description="User-defined prompt format string, e.g. '[INST] {instruction} [/INST]'.")
    no_input_format: str | None = None
    # preference / kto / prm / prompts
    field_prompt: str | None = None
    field_chosen: str | None = None
    field_rejected: str | None = None
    field_completion: str | None = None
    field_label: str | None = None
    step_separator: str | None = Field(None, description="PRM step separator (default newline).")
    extra: dict[str, Any] | None = Field(None, description="Format-specific options.")


class DataSection(Section):
    datasets: list[DatasetEntry] = Field(default_factory=list, description="Training datasets, mixed together.")
    test_datasets: list[DatasetEntry] | None = Field(None, description="Held-out datasets for eval (instead of val_set_size).")
    val_set_size: float = Field(0.0, ge=0.0, description="Fraction (<1) or count (>=1) of rows held out for eval.")
    shuffle_merged_datasets: bool = Field(True, description="Shuffle rows after mixing datasets.")
    dataset_prepared_path: str | None = Field(None, description="Cache folder for tokenized data (default ~/.cache/tunery/prepared).")
    dataset_num_proc: int | None = Field(None, ge=1, description="Tokenization workers.")
    sequence_len: int = Field(2048, ge=8, description="Longest row in tokens.")
    sample_packing: bool = Field(False, description="Pack several examples into each row of sequence_len.")
    pad_to_sequence_len: bool = Field(False, description="Accepted for compatibility; batches are padding-free.")
    train_on_inputs: bool = Field(False, description="Also train on prompt/user tokens.")
    excess_length_strategy: Literal["drop", "truncate", "error"] = Field("drop", description="What to do with rows over sequence_len.")
    skip_invalid_rows: bool = Field(False, description="Skip malformed rows (counted) instead of stopping.")
    chat_template: str | None = Field(None, description="tokenizer_default, chatml, llama3, gemma, ... or jinja.")
    chat_template_jinja: str | None = Field(None, description="The Jinja template when chat_template is jinja.")
    default_system_message: str | None = None
    special_tokens: dict[str, str] | None = Field(None, description="Tokens to set on the tokenizer (pad_token, ...).")
