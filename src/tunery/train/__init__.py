"""The training loop, optimizer, schedule, checkpoints, metrics and distribution."""

import sys
import types

from .loop import Trainer, train

__all__ = ["Trainer", "train"]


class _CallablePackage(types.ModuleType):
    """`tunery.train(config)` is the documented Python API, and `tunery.train` is also this package's name:
    importing any `tunery.train.*` module rebinds the attribute `tunery.train` from the function to this
    package (Python's import system does that), so a notebook's second `tunery.train(...)` would fail.
    Calling the package trains, whichever of the two the name holds."""

    def __call__(self, config, overrides=None):
        return train(config, overrides)


sys.modules[__name__].__class__ = _CallablePackage
