"""A config that arrives from the web UI: confined paths, no code, then the same schema as the CLI.

`check` returns the config the run will use (paths made absolute, output_dir set by the Studio) plus
two lists: `forbidden` (what the Studio refuses for safety: HTTP 403 on launch) and `problems`
(what the schema or the file checks reject: HTTP 400 on launch).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .security import CALLABLE_RE, BadPath, PathNotAllowed, confine
from .settings import StudioSettings

# Keys that name a local file or folder.
PATH_KEYS = ("base_model", "base_model_config", "tokenizer_config", "lora_model_dir", "dataset_prepared_path")
DATASET_LISTS = ("datasets", "test_datasets")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Set by the Studio, not by the page.
STUDIO_KEYS = ("output_dir",)


@dataclass
class Checked:
    config: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    forbidden: list[str] = field(default_factory=list)
    cfg: Any = None  # the validated tunery Config, when there are no problems

    @property
    def ok(self) -> bool:
        return not self.problems and not self.forbidden

    def yaml(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True)


def builtin_reward_names() -> set[str] | None:
    """The GRPO reward functions shipped with Tunery (None when this build has no GRPO rewards)."""
    try:
        from ..methods.rewards import BUILTINS
    except Exception:
        return None
    return set(BUILTINS)


def _looks_local(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or "\\" in value or value.endswith((".gguf", ".json", ".jsonl",
                                                                                 ".parquet", ".csv", ".arrow"))


def _walk_strings(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk_strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_strings(v, f"{path}.{i}")
    elif isinstance(node, str):
        yield path, node


def refuse_code(data: dict[str, Any], forbidden: list[str]) -> None:
    """Refuse what would run code supplied over the network."""
    if data.get("trust_remote_code"):
        forbidden.append("trust_remote_code: not allowed from the Studio (it runs Python code from the model "
                         "folder); use the CLI if you trust that code")
    grpo = data.get("grpo")
    if isinstance(grpo, dict) and grpo.get("reward_funcs") is not None:
        funcs = grpo["reward_funcs"]
        funcs = funcs if isinstance(funcs, list) else [funcs]
        builtins = builtin_reward_names()
        for i, f in enumerate(funcs):
            name = str(f)
            if (builtins is not None and name not in builtins) or (builtins is None and not name.isidentifier()):
                known = f" (built-in: {', '.join(sorted(builtins))})" if builtins else ""
                forbidden.append(f"grpo.reward_funcs.{i}: {name!r} is not a built-in reward; the Studio does not "
                                 f"import code named over the network{known}. Use the CLI for custom rewards")
    for key in DATASET_LISTS:
        for i, d in enumerate(data.get(key) or []):
            if isinstance(d, dict) and isinstance(d.get("type"), str) and (":" in d["type"] or "." in d["type"]):
                forbidden.append(f"{key}.{i}.type: {d['type']!r} names Python code; only the built-in formats "
                                 "are allowed from the Studio")
    uri = data.get("mlflow_tracking_uri")
    if uri and not str(uri).startswith(("http://", "https://")):
        forbidden.append("mlflow_tracking_uri: only http(s) tracking servers are allowed from the Studio")
    for where, s in _walk_strings(data):
        if CALLABLE_RE.match(s) and "." in s.split(":", 1)[0] and not any(f.startswith(where + ":") for f in forbidden):
            forbidden.append(f"{where}: {s!r} looks like a Python import path; the Studio does not import code "
                             "named over the network")


def _confine_key(holder: dict[str, Any], key: str, where: str, settings: StudioSettings, forbidden: list[str],
                 problems: list[str], allow_hub: bool) -> None:
    value = holder.get(key)
    if value is None or value == "":
        return
    if not isinstance(value, str):
        problems.append(f"{where}: expected a path, got {type(value).__name__}")
        return
    if key == "base_model" and value == "default":
        return
    if allow_hub and HUB_ID.match(value) and not _looks_local(value) and not (settings.runs_dir / value).exists():
        return  # a hub id: fetched by the trainer only if the hub is reachable
    try:
        holder[key] = str(confine(value, settings.read_roots(), base=settings.runs_dir))
    except PathNotAllowed as e:
        forbidden.append(f"{where}: {e}")
    except BadPath as e:
        problems.append(f"{where}: {e}")


def _confine_paths(data: dict[str, Any], settings: StudioSettings, forbidden: list[str], problems: list[str]) -> None:
    for key in PATH_KEYS:
        _confine_key(data, key, key, settings, forbidden, problems, allow_hub=key in ("base_model", "tokenizer_config"))
    for key in DATASET_LISTS:
        entries = data.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            continue  # the schema reports it
        for i, d in enumerate(entries):
            if not isinstance(d, dict):
                continue
            _confine_key(d, "path", f"{key}.{i}.path", settings, forbidden, problems, allow_hub=True)
            files = d.get("data_files")
            if files:
                for j, f in enumerate(files if isinstance(files, list) else [files]):
                    if isinstance(f, str) and (Path(f).is_absolute() or ".." in Path(f).parts):
                        forbidden.append(f"{key}.{i}.data_files.{j}: must be a plain name inside the dataset folder")
    rfc = data.get("resume_from_checkpoint")
    if rfc not in (None, "", "auto"):
        forbidden.append("resume_from_checkpoint: the Studio resumes with the Resume button (auto) only")


def _file_problems(data: dict[str, Any]) -> list[str]:
    problems = []
    for key in DATASET_LISTS:
        for i, d in enumerate(data.get(key) or []):
            if not isinstance(d, dict) or not isinstance(d.get("path"), str):
                continue
            p = d["path"]
            if not p.strip():
                problems.append(f"{key}.{i}.path: choose a dataset file (a path, or upload one)")
                continue
            if Path(p).is_absolute() and not any(ch in p for ch in "*?[") and not Path(p).exists():
                problems.append(f"{key}.{i}.path: file not found: {p}")
    bm = data.get("base_model")
    if isinstance(bm, str) and Path(bm).is_absolute() and not Path(bm).exists():
        problems.append(f"base_model: no such file or folder: {bm}")
    if not data.get("datasets"):
        problems.append("datasets: at least one dataset is needed to train")
    return problems


def check(raw: Any, settings: StudioSettings, run_dir: Path | None = None) -> Checked:
    """Sanitize and validate a config sent by the page. `run_dir` fixes output_dir (default: a placeholder)."""
    if not isinstance(raw, dict):
        return Checked({}, problems=["the config must be a mapping of keys"])
    data = copy.deepcopy(raw)
    forbidden: list[str] = []
    problems: list[str] = []
    refuse_code(data, forbidden)
    _confine_paths(data, settings, forbidden, problems)
    for key in STUDIO_KEYS:
        data.pop(key, None)
    data["output_dir"] = str(run_dir or settings.runs_dir / "<run name>")
    checked = Checked(data, problems, forbidden)
    from ..config import ConfigError, build_config

    try:
        checked.cfg = build_config(data)
    except ConfigError as e:
        problems.extend(e.problems)
    problems.extend(p for p in _file_problems(data) if p not in problems)
    return checked


def parse_yaml_overrides(text: str) -> dict[str, Any]:
    """The page's advanced box: YAML merged over the form's keys."""
    if not text or not text.strip():
        return {}
    data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("the advanced YAML must be a mapping of keys")
    return data
