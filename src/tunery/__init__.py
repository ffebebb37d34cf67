"""Tunery: fast, lean, reproducible LLM fine-tuning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# CPU runs: OpenMP threads that sleep instead of spinning when they wait. torch's threads spin by
# default, and when another busy process shares the cores (a second run, the test suite, the Studio)
# they fight it: on 2 cores two SmolLM2 training processes each took 12.5 s/step with spinning and
# 2.9 s/step with PASSIVE (1.58 s/step alone; PASSIVE alone 1.69). Set before torch loads its OpenMP
# runtime, so only when tunery is imported first (the CLI always is); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def train(config: str | Path | dict[str, Any] | Any, overrides: list[str] | None = None) -> Path:
    """Train from a YAML path, a dict or a Config and return the run directory."""
    from .train.loop import train as _train

    return _train(config, overrides)


def load_config(config: Any, overrides: list[str] | None = None):
    from .config import load_config as _load

    return _load(config, overrides)


__all__ = ["__version__", "load_config", "train"]
