"""The prepared-data cache: one folder per content fingerprint, written atomically, no pickle.

Layout of <root>/<fingerprint>/: meta.json (kind, stats, files, and per split the columns: how each is
stored), and for every list-of-ints column one .bin file of int32 values plus one of int64 row lengths.
Other columns (booleans, numbers, dicts) are stored in meta.json. The folder is built under a temporary
name and renamed into place, so a reader sees either nothing or a complete cache.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from itertools import accumulate, chain
from pathlib import Path
from typing import Any

import numpy as np

from .types import PreparedData

FORMAT_VERSION = 1


def default_root() -> Path:
    base = os.environ.get("TUNERY_CACHE")
    if base:
        return Path(base).expanduser() / "prepared"
    return Path("~/.cache/tunery/prepared").expanduser()


def _is_int_lists(values: list[Any]) -> bool:
    for v in values[:64]:
        if not isinstance(v, list) or (v and not isinstance(v[0], int)) or (v and isinstance(v[0], bool)):
            return False
    return all(isinstance(v, list) for v in values)


def _write_split(folder: Path, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    columns: dict[str, Any] = {}
    for k in keys:
        values = [r.get(k) for r in rows]
        if _is_int_lists(values):
            lens = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
            flat = np.fromiter(chain.from_iterable(values), dtype=np.int32, count=int(lens.sum()))
            (folder / f"{name}.{k}.bin").write_bytes(flat.tobytes())
            (folder / f"{name}.{k}.len").write_bytes(lens.tobytes())
            columns[k] = {"ints": True}
        else:
            columns[k] = {"ints": False, "values": values}
    return {"rows": len(rows), "keys": keys, "columns": columns}


def _read_split(folder: Path, name: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    n = meta["rows"]
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for k in meta["keys"]:
        col = meta["columns"][k]
        if col["ints"]:
            values = np.frombuffer((folder / f"{name}.{k}.bin").read_bytes(), dtype=np.int32).tolist()
            lens = np.frombuffer((folder / f"{name}.{k}.len").read_bytes(), dtype=np.int64).tolist()
            if sum(lens) != len(values):
                raise ValueError(f"{name}.{k}: lengths do not add up")
            start = 0
            for r, end in zip(rows, accumulate(lens)):
                r[k] = values[start:end]
                start = end
        else:
            for r, v in zip(rows, col["values"]):
                r[k] = v
    return rows


def _remove_stale_temporaries(root: Path, max_age_s: float = 86400.0) -> None:
    """Temporary folders of writers that were killed mid-write."""
    now = time.time()
    for p in root.glob(".*.tmp"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def save(root: Path, data: PreparedData) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = root / data.fingerprint
    tmp = root / f".{data.fingerprint}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        meta: dict[str, Any] = {"version": FORMAT_VERSION, "kind": data.kind, "fingerprint": data.fingerprint,
                                "files": data.files, "stats": data.stats, "splits": {}}
        meta["splits"]["train"] = _write_split(tmp, "train", data.train)
        if data.eval is not None:
            meta["splits"]["eval"] = _write_split(tmp, "eval", data.eval)
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent writer's complete copy: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load(root: Path, fingerprint: str) -> PreparedData | None:
    folder = root / fingerprint
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != FORMAT_VERSION or meta.get("fingerprint") != fingerprint:
            raise ValueError("another cache format")
        train = _read_split(folder, "train", meta["splits"]["train"])
        ev = _read_split(folder, "eval", meta["splits"]["eval"]) if "eval" in meta["splits"] else None
    except (OSError, ValueError, KeyError, TypeError):
        shutil.rmtree(folder, ignore_errors=True)  # damaged: rebuilt and written again by the caller
        return None
    return PreparedData(train=train, eval=ev, stats=meta["stats"], fingerprint=fingerprint,
                        files=meta["files"], kind=meta["kind"])
