"""Where rows come from: local files (json, jsonl, parquet, csv, arrow; .gz too), folders, globs, hub ids.

Each source is read in two steps so a cache hit costs only hashing: `resolve` lists the files and their
sha256, `read` parses them into rows (plain dicts) with their 1-based row numbers for error messages.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# Bookkeeping files of datasets.save_to_disk folders, never data.
_NOT_DATA = {"dataset_info.json", "state.json", "dataset_dict.json"}


@dataclass
class Part:
    """Rows of one file (or one hub split): row_numbers[i] is the 1-based row of rows[i] in that file."""

    source: str
    rows: list[dict[str, Any]]
    row_numbers: list[int]


@dataclass
class ResolvedSource:
    """One dataset entry, located: its local files with their content hashes, or a loaded hub dataset."""

    label: str
    files: list[tuple[Path, str]] = field(default_factory=list)  # (path, file type)
    hashes: dict[str, str] = field(default_factory=dict)
    hub: Any = None  # a datasets.Dataset when the entry is a hub id


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_type(path: Path, forced: str | None = None) -> str | None:
    if forced:
        return forced
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, kind in SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _folder_files(folder: Path, data_files: list[str] | None, forced: str | None) -> list[Path]:
    if data_files:
        found: list[Path] = []
        for pattern in data_files:
            matches = sorted(Path(p) for p in globlib.glob(str(folder / pattern), recursive=True))
            if not matches:
                raise DataError(f"{folder}: data_files entry {pattern!r} matches no file in the folder")
            found += matches
        return found
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in _NOT_DATA
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)
             and file_type(p, forced) is not None]
    if not files:
        raise DataError(f"{folder}: the folder holds no data file (.jsonl, .json, .parquet, .csv, .arrow, or .gz "
                        "of those)")
    return files


def _looks_like_hub_id(path: str) -> bool:
    """`owner/name` or `name`: no leading ./ / ~, no glob, no file suffix, at most one slash."""
    return (not path.startswith((".", "/", "~")) and not _has_glob(path) and path.count("/") <= 1
            and "\\" not in path and file_type(Path(path)) is None)


def resolve(entry: Any, base_dir: Path | None, hash_files: bool = True) -> ResolvedSource:
    """Find the files of a dataset entry (path, folder or glob) or, for a hub id, load it when reachable."""
    raw = os.path.expanduser(entry.path)
    path = Path(raw)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    data_files = [entry.data_files] if isinstance(entry.data_files, str) else entry.data_files
    files: list[Path]
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _folder_files(path, data_files, entry.ds_type)
    elif _has_glob(raw):
        files = [Path(p) for p in sorted(globlib.glob(str(path), recursive=True)) if Path(p).is_file()]
        if not files:
            raise DataError(f"dataset path {entry.path!r}: the glob matches no file (looked in {path.parent})")
    elif not _looks_like_hub_id(entry.path):
        raise DataError(f"dataset path {entry.path!r}: no such file or folder ({path}); relative paths are read "
                        "from the config file's folder")
    else:
        return ResolvedSource(label=f"hub:{entry.path}", hub=_load_hub(entry))
    src = ResolvedSource(label=str(path))
    for f in files:
        kind = file_type(f, entry.ds_type)
        if kind is None:
            raise DataError(f"{f}: unknown file type; name it .jsonl, .json, .parquet, .csv or .arrow "
                            "(optionally .gz), or set ds_type on the dataset entry")
        src.files.append((f, kind))
        if hash_files:
            src.hashes[str(f)] = sha256_file(f)
    return src


def _load_hub(entry: Any) -> Any:
    hint = (f"dataset {entry.path!r} is not a local file, folder or glob, so it was taken as a hub dataset id, "
            "and the hub cannot be reached from this machine")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        hint += " (HF_HUB_OFFLINE=1)"
    hint += ". Download it elsewhere and point `path` at the local files (jsonl, parquet, ...)."
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(hint) from e
    try:
        ds = datasets.load_dataset(entry.path, name=entry.name, split=entry.split or "train",
                                   data_files=entry.data_files, revision=entry.revision)
    except Exception as e:
        raise DataError(f"{hint} [{type(e).__name__}: {str(e)[:300]}]") from None
    return ds


# ------------------------------------------------------------------------------------------------- reading


def _open_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.decompress(data)
    return data


def _json_error(path: Path, row: int, e: Exception) -> DataError:
    return DataError(f"{path}: row {row}: not valid JSON ({e}); each line of a .jsonl file must be one JSON object")


def _check_rows(path: Path, rows: list[Any], numbers: list[int]) -> None:
    for r, n in zip(rows, numbers):
        if not isinstance(r, dict):
            raise DataError(f"{path}: row {n}: expected a JSON object with named fields, got {type(r).__name__}")


def _read_jsonl(path: Path, text: str) -> Part:
    rows: list[Any] = []
    numbers: list[int] = []
    loads = json.loads
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(loads(line))
        except ValueError as e:
            raise _json_error(path, i, e) from None
        numbers.append(i)
    _check_rows(path, rows, numbers)
    return Part(str(path), rows, numbers)


def _read_json(path: Path, data: bytes) -> Part:
    text = data.decode("utf-8-sig")
    head = text.lstrip()[:1]
    if head == "[":
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        numbers = list(range(1, len(rows) + 1))
        _check_rows(path, rows, numbers)
        return Part(str(path), rows, numbers)
    try:
        obj = json.loads(text)
    except ValueError:
        return _read_jsonl(path, text)  # a .json file holding one object per line
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(obj) == 1 and len(lists) == 1:  # {"data": [...]}
            rows = lists[0]
            return Part(str(path), rows, list(range(1, len(rows) + 1)))
        return Part(str(path), [obj], [1])
    raise DataError(f"{path}: expected a JSON list of objects or one object per line, got {type(obj).__name__}")


def _read_arrow_table(path: Path, kind: str, data: bytes) -> Any:
    import pyarrow as pa

    buf = pa.BufferReader(data)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(buf)
        if kind == "csv":
            import pyarrow.csv as pcsv

            # CSV cells are text: keep them as written ("007" stays "007"), except true/false columns,
            # which become booleans (kto labels).
            probe = pcsv.read_csv(io.BytesIO(data))
            types = {f.name: (pa.bool_() if pa.types.is_boolean(f.type) else pa.string()) for f in probe.schema}
            return pcsv.read_csv(io.BytesIO(data), convert_options=pcsv.ConvertOptions(column_types=types))
        import pyarrow.ipc as ipc

        try:
            return ipc.open_file(buf).read_all()
        except pa.ArrowInvalid:
            return ipc.open_stream(pa.BufferReader(data)).read_all()  # datasets.save_to_disk writes streams
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot be read as {kind}: {e}") from None


def read_file(path: Path, kind: str) -> Part:
    data = _open_bytes(path)
    if kind == "jsonl":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        return _read_jsonl(path, text)
    if kind == "json":
        return _read_json(path, data)
    table = _read_arrow_table(path, kind, data)
    rows = table.to_pylist()
    return Part(str(path), rows, list(range(1, len(rows) + 1)))


def read(src: ResolvedSource) -> list[Part]:
    if src.hub is not None:
        rows = src.hub.to_list()
        return [Part(src.label, rows, list(range(1, len(rows) + 1)))]
    return [read_file(f, kind) for f, kind in src.files]


def hub_hash(src: ResolvedSource) -> str:
    return str(getattr(src.hub, "_fingerprint", "")) or hashlib.sha256(repr(src.hub).encode()).hexdigest()
