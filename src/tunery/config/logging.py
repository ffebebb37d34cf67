"""Experiment trackers (used only when installed and enabled)."""

from __future__ import annotations

from pydantic import Field

from .base import Section


class LoggingSection(Section):
    use_tensorboard: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_mode: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None
    progress_bar: bool = Field(True, description="Show a progress bar on a terminal.")
