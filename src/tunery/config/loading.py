"""Read YAML, apply key=value overrides, turn validation errors into readable problems."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .compat import normalize
from .schema import Config


class ConfigError(ValueError):
    """A config that cannot run; `problems` holds one readable line per issue."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid config{where}:\n" + "\n".join(f"  - {p}" for p in problems))


def _known_keys(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Field names valid at `path` (for did-you-mean on unknown keys)."""
    cls: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        cls = _model_in(ann)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}).keys())


def _model_in(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_keys(Config, loc[:-1])
            guess = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            problems.append(f"{key}: unknown key{hint}")
        elif e["type"] == "value_error" and not loc:
            for part in str(e["msg"]).removeprefix("Value error, ").split("\n"):
                problems.append(part)
        else:
            problems.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([f"override '{text}' is not key=value"])
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys (`datasets.0.path=x.jsonl`) on the raw dict before validation."""
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt_is_index = parts[i + 1].isdigit()
            if isinstance(node, list):
                idx = int(part)
                if idx >= len(node):
                    raise ConfigError([f"override {text}: index {idx} is past the end of the list ({len(node)} items)"])
                node = node[idx]
            else:
                if part not in node or node[part] is None:
                    node[part] = [] if nxt_is_index else {}
                node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last)
            if idx >= len(node):
                raise ConfigError([f"override {text}: index {idx} is past the end of the list"])
            node[idx] = value
        else:
            node[last] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML: {e}"], str(p)) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of keys, got {type(data).__name__}"], str(p))
    return data


def build_config(data: dict[str, Any], source: str | None = None) -> Config:
    data, problems = normalize(data, Config)  # the common trainers' keys (compat.py)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(problems + format_errors(e), source) from None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(
    config: str | Path | dict[str, Any] | Config, overrides: list[str] | None = None, base_dir: str | Path | None = None
) -> Config:
    """Path, dict or Config -> validated Config. Relative dataset paths resolve against the YAML's folder."""
    if isinstance(config, Config):
        if not overrides:
            return config
        data = config.model_dump(mode="json", exclude_unset=True)
        source = None
    elif isinstance(config, dict):
        data, source = dict(config), None
    else:
        data, source = read_yaml(config), str(config)
    data = apply_overrides(data, list(overrides or []))
    cfg = build_config(data, source)
    return cfg
