"""The other parts of Tunery the Studio shows: data preview, memory planner, chat, export.

Each is called through its public function. A part that is not installed in this build gives a clear
"not available" answer (`Unavailable`) instead of an error page.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Unavailable(RuntimeError):
    """A Tunery feature this build does not have (yet)."""


def _attr(module: str, name: str):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise Unavailable(f"{module} is not available in this build ({e})") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise Unavailable(f"{module}.{name} is not available in this build")
    return fn


def available(module: str, name: str) -> bool:
    try:
        _attr(module, name)
        return True
    except Unavailable:
        return False
    except Exception:
        return False


_features: dict[str, Any] = {"t": 0.0, "value": None}


def features(max_age_s: float = 30.0) -> dict[str, bool]:
    """Which parts this build has (imports them once; re-checked every `max_age_s`)."""
    now = time.time()
    if _features["value"] is None or now - _features["t"] > max_age_s:
        _features.update(t=now, value=_features_now())
    return _features["value"]


def _features_now() -> dict[str, bool]:
    return {
        "preview": available("tunery.data", "preview"),
        "plan": available("tunery.train.plan", "plan"),
        "chat": available("tunery.inference", "load_for_inference"),
        "merge": available("tunery.export.merge", "merge_run"),
        "export": available("tunery.export", "export_run"),
    }


# ---------------------------------------------------------------------------- preview
_tokenizers: dict[str, Any] = {}


def _tokenizer_for(cfg) -> Any:
    from ..models import load_tokenizer, resolve_model_path

    key = str(cfg.tokenizer_config or cfg.base_model)
    if key not in _tokenizers:
        _tokenizers.clear()
        _tokenizers[key] = load_tokenizer(cfg.tokenizer_config or resolve_model_path(cfg.base_model))
    return _tokenizers[key]


def preview(cfg, n: int = 3) -> list[dict[str, Any]]:
    """A few rendered training examples: blocks of segments [{text, trained}] (trained = carries labels)."""
    fn = _attr("tunery.data", "preview")
    tok = _tokenizer_for(cfg)
    return [_example(ex, tok) for ex in fn(cfg, tok, n)]


def _segments(tok, ids: list[int], labels: list[int] | None) -> list[dict[str, Any]]:
    """Decode runs of trained / masked tokens (label -100 = masked)."""
    if labels is None:
        return [{"text": tok.decode(ids, skip_special_tokens=False), "trained": False}]
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(ids):
        trained = labels[i] != -100
        j = i
        while j < len(ids) and (labels[j] != -100) == trained:
            j += 1
        out.append({"text": tok.decode(ids[i:j], skip_special_tokens=False), "trained": trained})
        i = j
    return out


def _example(ex: dict[str, Any], tok) -> dict[str, Any]:
    """One preview row as {blocks: [{title, segments}], tokens, trained_tokens}."""
    blocks = []
    if "chosen_input_ids" in ex:
        for side in ("chosen", "rejected"):
            blocks.append({"title": side, "segments": _segments(tok, ex[f"{side}_input_ids"], ex[f"{side}_labels"])})
        ids, labels = ex["chosen_input_ids"], ex["chosen_labels"]
    elif "prompt_ids" in ex:
        blocks.append({"title": "prompt", "segments": _segments(tok, ex["prompt_ids"], None)})
        ids, labels = ex["prompt_ids"], None
    else:
        ids, labels = ex.get("input_ids", []), ex.get("labels")
        title = None
        if "kto_label" in ex:
            title = "desirable" if ex["kto_label"] else "undesirable"
        blocks.append({"title": title, "segments": _segments(tok, ids, labels)})
    trained = sum(1 for x in labels if x != -100) if labels is not None else 0
    return {"blocks": blocks, "tokens": len(ids), "trained_tokens": trained}


# ---------------------------------------------------------------------------- planner
def plan(cfg, gpu_mem: str | None) -> dict[str, Any]:
    """The memory planner's verdict and report (`tunery plan`)."""
    plan_fn = _attr("tunery.train.plan", "plan")
    fmt = _attr("tunery.train.plan", "format_report")
    size = _attr("tunery.train.plan", "parse_bytes")(gpu_mem) if gpu_mem else None
    report = plan_fn(cfg, size)
    return {"fits": bool(report.fits), "report": fmt(report)}


# ---------------------------------------------------------------------------- export
QUANTS = ["f16", "bf16", "q8_0"]


def export_quants() -> list[str]:
    """GGUF tensor types the exporter writes."""
    try:
        from ..export import QUANT_TYPES
    except Exception:
        return list(QUANTS)
    return [q for q in QUANT_TYPES if q != "f32"] or list(QUANTS)


# ---------------------------------------------------------------------------- chat
class ChatEngine:
    """One loaded model at a time (the last one asked for); callers hold `lock` while using it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.loaded: tuple[str, Any, Any, Any] | None = None  # (target, model, tokenizer, info)

    def is_loaded(self, target: Path) -> bool:
        return self.loaded is not None and self.loaded[0] == str(target)

    def load(self, target: Path) -> tuple[Any, Any, Any]:
        if self.loaded and self.loaded[0] == str(target):
            return self.loaded[1], self.loaded[2], self.loaded[3]
        load = _attr("tunery.inference", "load_for_inference")
        self.loaded = None  # let the old model go before the new one loads
        model, tok, info = load(str(target))
        self.loaded = (str(target), model, tok, info)
        return model, tok, info

    def unload(self) -> None:
        self.loaded = None

    def reply(self, target: Path, messages: list[dict[str, str]], settings: dict[str, Any],
              on_text: Callable[[str], None], stop: threading.Event) -> int:
        """Generate the assistant's reply to `messages`, passing text pieces to `on_text`; returns tokens."""
        model, tok, _ = self.load(target)
        chat_prompt_ids = _attr("tunery.generate.chat", "chat_prompt_ids")
        engine_for = _attr("tunery.generate", "engine_for")
        sampling = _attr("tunery.generate", "SamplingParams")
        text_stream = _attr("tunery.generate", "TextStream")
        seed = settings.pop("seed", None)
        params = sampling(**settings)
        ids = chat_prompt_ids(tok, messages)
        stream = text_stream(tok)
        count = 0

        def on_token(row: int, token_id: int) -> bool:
            nonlocal count
            if stop.is_set():
                return True  # the engine stops this row
            count += 1
            piece = stream.push(token_id)
            if piece:
                on_text(piece)
            return False

        engine_for(model, tok).generate([ids], params, stream=on_token, seed=seed)
        tail = stream.flush()
        if tail:
            on_text(tail)
        return count
