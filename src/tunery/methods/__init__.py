"""Training methods: one module each, `loss(model, batch, normalizer) -> (loss, metrics)`."""

from __future__ import annotations

from typing import Any


def build_method(cfg: Any):
    """The method object for `cfg.rl` (absent means SFT)."""
    rl = getattr(cfg, "rl", None)
    if rl is None:
        from .sft import SFT

        return SFT()
    from . import registry

    return registry.build(rl, cfg)
