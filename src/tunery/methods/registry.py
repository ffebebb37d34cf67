"""`rl:` name -> the method object, built from the config's flat method keys."""

from __future__ import annotations

from typing import Any


def build(rl: str, cfg: Any):
    if rl == "dpo":
        from .dpo import DPO

        return DPO.from_config(cfg)
    if rl == "kto":
        from .kto import KTO

        return KTO.from_config(cfg)
    if rl == "orpo":
        from .orpo import ORPO

        return ORPO.from_config(cfg)
    if rl == "simpo":
        from .simpo import SimPO

        return SimPO.from_config(cfg)
    if rl == "rm":
        from .rm import RewardModel

        return RewardModel.from_config(cfg)
    if rl == "prm":
        from .prm import ProcessRewardModel

        return ProcessRewardModel.from_config(cfg)
    if rl == "grpo":
        import importlib

        try:
            grpo = importlib.import_module(f"{__package__}.grpo")
        except ModuleNotFoundError as e:
            raise ValueError("rl: grpo is not available in this version of tunery") from e
        return grpo.build(cfg)
    raise ValueError(f"rl: {rl!r} is not a known method (dpo, kto, orpo, simpo, rm, prm, grpo; absent means sft)")
