"""Run configuration: the pydantic schema (one module per section) and its loading."""

from .loading import ConfigError, apply_overrides, build_config, load_config, read_yaml
from .schema import Config

__all__ = ["Config", "ConfigError", "apply_overrides", "build_config", "load_config", "read_yaml"]
