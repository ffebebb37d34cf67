"""Tunery: fast, lean, reproducible LLM fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def train(config: str | Path | dict[str, Any] | Any, overrides: list[str] | None = None) -> Path:
    """Train from a YAML path, a dict or a Config and return the run directory."""
    from .train.loop import train as _train

    return _train(config, overrides)


def load_config(config: Any, overrides: list[str] | None = None):
    from .config import load_config as _load

    return _load(config, overrides)


__all__ = ["__version__", "load_config", "train"]
