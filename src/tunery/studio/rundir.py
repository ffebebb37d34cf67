"""Reading a run directory as the trainer writes it: config.yaml, manifest.json, status.json,
metrics.jsonl, train.log, checkpoints/step-N, adapter/ or model/."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

RUN_MARKERS = ("config.yaml", "manifest.json", "status.json")
SKIP_DIRS = {"uploads", "checkpoints", "adapter", "model", "exports", "tensorboard", "wandb", "mlruns", "__pycache__"}


def is_run_dir(p: Path) -> bool:
    return any((p / m).is_file() for m in RUN_MARKERS)


def find_run_dirs(root: Path, max_depth: int = 3) -> list[Path]:
    """Folders under `root` that hold a run (not descending into a run's own sub-folders)."""
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if not e.is_dir(follow_symlinks=False) or e.name.startswith(".") or e.name in SKIP_DIRS:
                continue
            p = Path(e.path)
            if is_run_dir(p):
                found.append(p)
            elif depth < max_depth:
                walk(p, depth + 1)

    walk(root, 1)
    return found


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def read_config(run: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run / "config.yaml").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def _read_tail(path: Path, tail_bytes: int) -> tuple[str, int] | None:
    """(the last tail_bytes of a file as text, the file's size), or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            return f.read().decode("utf-8", "replace"), size
    except OSError:
        return None


def last_rows(path: Path, tail_bytes: int = 16384) -> list[dict[str, Any]]:
    """The last few parsed rows of a jsonl file, cheaply."""
    got = _read_tail(path, tail_bytes)
    if got is None:
        return []
    chunk, size = got
    return _dict_rows(chunk.splitlines()[(1 if size > tail_bytes else 0):])


def _dict_rows(lines: list[bytes] | list[str]) -> list[dict[str, Any]]:
    """The lines that parse as JSON objects; a torn or foreign line is skipped (the trainer may be mid-write)."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def method_of(cfg: dict[str, Any]) -> str:
    rl = cfg.get("rl")
    name = str(rl) if rl else "sft"
    adapter = cfg.get("adapter")
    return f"{name} · {adapter}" if adapter else f"{name} · full"


def dataset_of(cfg: dict[str, Any]) -> str:
    ds = cfg.get("datasets") or []
    names = []
    for d in ds:
        if isinstance(d, dict) and d.get("path"):
            names.append(Path(str(d["path"])).name or str(d["path"]))
    if not names:
        return ""
    return names[0] + (f" +{len(names) - 1}" if len(names) > 1 else "")


def model_of(cfg: dict[str, Any]) -> str:
    bm = str(cfg.get("base_model") or "default")
    if bm == "default":
        return "default (SmolLM2-135M-Instruct)"
    return Path(bm).name if bm.startswith(("/", ".", "~")) else bm


def checkpoints(run: Path) -> list[dict[str, Any]]:
    out = []
    ck = run / "checkpoints"
    if ck.is_dir():
        for d in ck.iterdir():
            m = re.fullmatch(r"step-(\d+)", d.name)
            if m and d.is_dir() and not d.name.startswith("."):
                out.append({"step": int(m.group(1)), "path": f"checkpoints/{d.name}"})
    return sorted(out, key=lambda c: c["step"])


def final_weights(run: Path) -> str | None:
    for name in ("adapter", "model"):
        if (run / name).is_dir():
            return name
    return None


def summarize(run: Path) -> dict[str, Any]:
    """Everything the runs list shows, read from the run's own files."""
    cfg = read_config(run)
    manifest = read_json(run / "manifest.json") or {}
    status = read_json(run / "status.json") or {}
    rows = last_rows(run / "metrics.jsonl")
    last_loss = next((r["loss"] for r in reversed(rows) if isinstance(r.get("loss"), (int, float))), None)
    last_eval = next((r["eval_loss"] for r in reversed(rows) if isinstance(r.get("eval_loss"), (int, float))), None)
    elapsed = next((r["elapsed_s"] for r in reversed(rows) if isinstance(r.get("elapsed_s"), (int, float))), None)
    started = None
    if manifest.get("created"):
        try:
            started = datetime.fromisoformat(str(manifest["created"])).timestamp()
        except ValueError:
            started = None
    try:
        status_mtime = (run / "status.json").stat().st_mtime
    except OSError:
        status_mtime = None
    return {
        "file_state": status.get("state"),
        "step": status.get("step"),
        "total_steps": status.get("total_steps") or manifest.get("total_steps") or cfg.get("max_steps"),
        "method": method_of(cfg) if cfg else "",
        "model": model_of(cfg) if cfg else "",
        "dataset": dataset_of(cfg),
        "started": started,
        "elapsed_s": elapsed,
        "last_loss": last_loss,
        "last_eval_loss": last_eval,
        "status_mtime": status_mtime,
        "final": final_weights(run),
        "checkpoints": len(checkpoints(run)),
    }


def signature(run: Path) -> str:
    """Changes whenever a file the summary reads changes."""
    parts = []
    for name in ("config.yaml", "manifest.json", "status.json", "metrics.jsonl", "adapter", "model", "checkpoints"):
        try:
            st = (run / name).stat()
            parts.append(f"{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append("-")
    return "|".join(parts)


class JsonlTail:
    """Reads rows appended to a jsonl file since the last call; notices truncation (a resumed run)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.ident: tuple[int, int] | None = None
        self.partial = b""

    def read(self) -> tuple[bool, list[dict[str, Any]]]:
        """(reset, new rows): reset means drop what was read before and start from these rows."""
        try:
            st = self.path.stat()
        except OSError:
            reset = self.offset > 0
            self.offset, self.ident, self.partial = 0, None, b""
            return reset, []
        ident = (st.st_dev, st.st_ino)
        reset = False
        if self.ident is not None and (ident != self.ident or st.st_size < self.offset):
            reset = True
            self.offset, self.partial = 0, b""
        self.ident = ident
        if st.st_size == self.offset:
            return reset, []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        return reset, _dict_rows(lines)


def log_tail(path: Path, max_lines: int = 200, tail_bytes: int = 65536) -> list[str]:
    """The end of a log, with progress-bar carriage returns collapsed to their last state."""
    got = _read_tail(path, tail_bytes)
    if got is None:
        return []
    text, size = got
    lines = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        segs = [s for s in raw.split("\r") if s.strip()]
        lines.append(segs[-1] if segs else raw.strip("\r"))
    if size > tail_bytes and lines:
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines.pop()
    return [_strip_ansi(x) for x in lines[-max_lines:]]


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _strip_ansi(s: str) -> str:
    return _ANSI.sub("", s)


def eta_seconds(rows: list[dict[str, Any]], step: int | None, total: int | None) -> float | None:
    """Seconds left, from the pace of the last few logged steps."""
    pts = [(r["step"], r["elapsed_s"]) for r in rows if "loss" in r and isinstance(r.get("elapsed_s"), (int, float))
           and isinstance(r.get("step"), int)]
    if not total or step is None or len(pts) < 2:
        return None
    pts = pts[-20:]
    (s0, t0), (s1, t1) = pts[0], pts[-1]
    if s1 <= s0 or t1 < t0:
        return None
    return max(0.0, (t1 - t0) / (s1 - s0) * (total - step))
