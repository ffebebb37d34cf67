"""Atomic outputs: a file or folder appears whole under its final name, or not at all.

What Tunery writes to keep (checkpoints, adapters, merged models, GGUF files, the converted default
model, cached reference log-probs) is written under a temp name beside the target, then renamed over
it. `tempfile` makes private temp names (0600 files, 0700 folders); the result gets the permissions an
ordinary write would have had (the umask's), so a server running as another user can read an export.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def share(tmp: Path) -> None:
    """The permissions a plain write would have given: 0666 / 0777 less the umask."""
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())


def publish(tmp: Path, out: Path, sync: bool = False) -> None:
    """Give the finished temp file or folder `tmp` the umask's permissions and rename it to `out` (a folder
    already there is replaced). `sync`: every file reaches the disk first, and the rename after it, so a
    crash leaves the old output or the new one, never half of one."""
    folder = tmp.is_dir()
    share(tmp)
    if sync:
        for f in (p for p in tmp.rglob("*") if p.is_file()) if folder else [tmp]:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if folder and out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    os.replace(tmp, out)
    if sync:
        fsync_dir(out.parent)


def write_text(path: str | Path, text: str) -> None:
    """`path` holds `text` whole, or what it held before."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_output(out: str | Path, folder: bool = False, sync: bool = False) -> Iterator[Path]:
    """Yields a temp path beside `out` (a file, or an empty folder with `folder`) to write; published as
    `out` when the block ends, removed if it raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        publish(tmp, out, sync)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
