"""GRPO reward functions: the built-ins, loading user functions named in the config, and calling them safely.

A reward function is `fn(prompts, completions, **columns) -> list[float]`: one float per completion. Columns are
the dataset row's other fields (GSM8K's `answer`), repeated for each of a prompt's completions; `completion_ids`
(token ids) is passed too. A function that does not take `**kwargs` gets only the keyword arguments it names.

User functions come from the config file only (`module:function`, or `path/to/file.py:function` relative to
the config's folder); their code runs in the training process, so a config is trusted like a script.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

RewardFn = Callable[..., Sequence[float]]

# ---- the built-ins ----------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str | None) -> str | None:
    """'$1,234.50' -> '1234.5', '72.' -> '72', '-0.0' -> '0'; None when there is no number."""
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("$", "").replace("\\$", "").strip()
    m = _NUMBER.search(cleaned)
    if m is None:
        return None
    try:
        d = Decimal(m.group(0).replace(",", ""))
    except InvalidOperation:
        return None
    if d == 0:
        return "0"
    s = format(d.normalize(), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    out = []
    while i < len(text):
        ch = text[i]
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return "".join(out)
        out.append(ch)
        i += 1
    return None


def final_answer(text: str) -> str | None:
    """The final number of a GSM8K-style solution: after the last `####`, else in the last \\boxed{}."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        n = normalize_number(tail.split("\n", 1)[0])
        if n is not None:
            return n
    box = _boxed(text)
    if box is not None:
        return normalize_number(box)
    return None


def gsm8k_answer(prompts: list[str], completions: list[str], answer: list[str] | None = None, **_: Any) -> list[float]:
    """1.0 when the completion's final number (after `####` or in \\boxed{}) equals the reference's, else 0.0."""
    if answer is None:
        raise ValueError("gsm8k_answer needs an `answer` column in the dataset (the reference solution ending in "
                         "'#### <number>', or just the number)")
    out = []
    for completion, ref in zip(completions, answer):
        ref_text = str(ref)
        want = final_answer(ref_text) if ("####" in ref_text or "\\boxed" in ref_text) else normalize_number(ref_text)
        got = final_answer(completion)
        out.append(1.0 if want is not None and got == want else 0.0)
    return out


def make_format_reward(pattern: str | None) -> RewardFn:
    if not pattern:
        raise ValueError("reward `format` needs grpo.format_pattern (a regular expression the completion must "
                         "contain, e.g. '####\\s*-?[\\d,.]+')")
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"grpo.format_pattern is not a valid regular expression: {e}") from None

    def format_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        """1.0 when grpo.format_pattern is found in the completion (anchor it with ^...$ for a full match)."""
        return [1.0 if rx.search(c) else 0.0 for c in completions]

    return format_reward


def make_length_reward(target: int | None) -> RewardFn:
    if not target or target < 1:
        raise ValueError("reward `length` needs grpo.length_target (a positive number of tokens)")

    def length(prompts: list[str], completions: list[str], completion_ids: list[list[int]] | None = None,
               **_: Any) -> list[float]:
        """0 up to grpo.length_target tokens, then -(excess / target), down to -1."""
        lens = [len(c) for c in completion_ids] if completion_ids is not None else [len(c.split()) for c in completions]
        return [-min(1.0, max(0, n - target) / target) for n in lens]

    return length


BUILTINS = ("gsm8k_answer", "format", "length")


# ---- loading ------------------------------------------------------------------------------------------------------

@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


def user_code_allowed() -> bool:
    """Servers that build configs from requests set TUNERY_ALLOW_USER_REWARDS=0: only built-ins are loaded then."""
    return os.environ.get("TUNERY_ALLOW_USER_REWARDS", "1").lower() not in ("0", "false", "no")


def load_user_function(spec: str, base_dir: Path | None = None) -> RewardFn:
    """`module:function` (importable, or a module file beside the config) or `path/to/file.py:function`."""
    if not user_code_allowed():
        raise ValueError(f"reward function {spec!r}: user reward code is disabled here "
                         "(TUNERY_ALLOW_USER_REWARDS=0); use a built-in: " + ", ".join(BUILTINS))
    if ":" not in spec:
        raise ValueError(f"reward function {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor "
                         "'module:function' / 'path/to/file.py:function'")
    target, func_name = spec.rsplit(":", 1)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = base / path
        if not path.is_file():
            where = "the config file's folder" if base_dir is not None else "the working directory (no config file)"
            raise ValueError(f"reward function {spec!r}: file {path} not found (relative paths are read from "
                             f"{where}: {base})")
        mod_name = f"tunery_rewards_{abs(hash(str(path.resolve())))}"
        sp = importlib.util.spec_from_file_location(mod_name, path)
        if sp is None or sp.loader is None:
            raise ValueError(f"reward function {spec!r}: cannot load {path} as Python")
        module = importlib.util.module_from_spec(sp)
        sys.modules[mod_name] = module
        try:
            sp.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"reward function {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        added = str(base) not in sys.path
        if added:
            sys.path.insert(0, str(base))
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ValueError(f"reward function {spec!r}: cannot import module {target!r} "
                             f"({type(e).__name__}: {e})") from e
        finally:
            if added:
                sys.path.remove(str(base))
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"reward function {spec!r}: module {target!r} has no function {func_name!r}")
    return fn


def load_rewards(grpo: Any, base_dir: Path | None = None) -> list[Reward]:
    """The reward functions of a config's `grpo:` section, with their weights (default 1 each)."""
    names = list(grpo.reward_funcs)
    if not names:
        raise ValueError("grpo.reward_funcs is empty: name at least one reward function")
    weights = list(grpo.reward_weights) if grpo.reward_weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"grpo.reward_weights has {len(weights)} entries for {len(names)} reward_funcs")
    out = []
    for spec, w in zip(names, weights):
        if spec == "gsm8k_answer":
            out.append(Reward("gsm8k_answer", gsm8k_answer, w))
        elif spec == "format":
            out.append(Reward("format", make_format_reward(grpo.format_pattern), w))
        elif spec == "length":
            out.append(Reward("length", make_length_reward(grpo.length_target), w))
        else:
            fn = load_user_function(spec, base_dir)
            out.append(Reward(getattr(fn, "__name__", spec.rsplit(":", 1)[-1]), fn, w))
    seen: dict[str, int] = {}
    for r in out:  # two functions of the same name get distinct metric names
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}_{seen[r.name]}"
    return out


# ---- calling ------------------------------------------------------------------------------------------------------

class RewardError(RuntimeError):
    """A reward function misbehaved; the message names it and says what went wrong."""


def _accepts(fn: RewardFn) -> tuple[bool, set[str]]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True, set()
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return var_kw, names


def call_reward(reward: Reward, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> list[float]:
    """Call one reward function and check its answer: one finite number per completion."""
    var_kw, names = _accepts(reward.fn)
    kwargs = columns if var_kw else {k: v for k, v in columns.items() if k in names}
    try:
        values = reward.fn(prompts, completions, **kwargs)
    except Exception as e:
        raise RewardError(f"reward function {reward.name!r} raised {type(e).__name__}: {e}") from e
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward function {reward.name!r} returned {type(values).__name__}, "
                          "expected a list of floats (one per completion)") from None
    if len(values) != len(completions):
        raise RewardError(f"reward function {reward.name!r} returned {len(values)} values for "
                          f"{len(completions)} completions (it must return one float per completion)")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward function {reward.name!r} returned {v!r} for completion {i}: "
                              "not a number") from None
        if not math.isfinite(f):
            raise RewardError(f"reward function {reward.name!r} returned {f} for completion {i}: rewards must be "
                              "finite numbers (no NaN or inf)")
        out.append(f)
    return out


def score(rewards: list[Reward], prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> torch.Tensor:
    """[N, F] float32: every reward function on every completion (unweighted)."""
    cols = [call_reward(r, prompts, completions, columns) for r in rewards]
    return torch.tensor(cols, dtype=torch.float32).t().reshape(len(completions), len(rewards))
