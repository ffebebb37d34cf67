"""What one Studio server is allowed to touch: its runs folder, extra model/data roots, limits."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def _env_paths(name: str) -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(name, "").split(os.pathsep) if p.strip()]


@dataclass
class StudioSettings:
    runs_dir: Path
    host: str = "127.0.0.1"
    port: int = 7860
    auth_token: str | None = None
    # Folders (besides runs_dir, which holds uploads) the web UI may read models and datasets from.
    model_roots: list[Path] = field(default_factory=list)
    data_roots: list[Path] = field(default_factory=list)
    max_upload_bytes: int = 1 << 30
    # The command that runs tunery verbs in a child process (tests swap in a fake trainer).
    tunery_cmd: list[str] = field(default_factory=lambda: [sys.executable, "-m", "tunery"])
    scan_interval_s: float = 5.0
    # Host headers accepted when bound to loopback (DNS-rebinding guard); None accepts any.
    allowed_hosts: set[str] | None = None

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir).expanduser().resolve()
        self.model_roots = [Path(p).expanduser().resolve() for p in self.model_roots]
        self.data_roots = [Path(p).expanduser().resolve() for p in self.data_roots]
        if self.allowed_hosts is None and is_loopback(self.host):
            self.allowed_hosts = set(LOOPBACK)

    @property
    def uploads_dir(self) -> Path:
        return self.runs_dir / "uploads"

    @property
    def db_path(self) -> Path:
        return self.runs_dir / "studio.db"

    def read_roots(self) -> list[Path]:
        """Every folder a path given over the network may point into."""
        roots = [self.runs_dir, *self.model_roots, *self.data_roots]
        seen: list[Path] = []
        for r in roots:
            if r not in seen:
                seen.append(r)
        return seen

    @classmethod
    def from_args(cls, args) -> StudioSettings:
        model_roots = list(getattr(args, "model_root", None) or []) + _env_paths("TUNERY_STUDIO_MODEL_ROOTS")
        data_roots = list(getattr(args, "data_root", None) or []) + _env_paths("TUNERY_STUDIO_DATA_ROOTS")
        max_mb = getattr(args, "max_upload_mb", None) or os.environ.get("TUNERY_STUDIO_MAX_UPLOAD_MB")
        kw = {"max_upload_bytes": int(float(max_mb) * (1 << 20))} if max_mb else {}
        return cls(runs_dir=Path(args.runs_dir), host=args.host, port=int(args.port),
                   auth_token=args.auth_token or os.environ.get("TUNERY_STUDIO_TOKEN") or None,
                   model_roots=model_roots, data_roots=data_roots, **kw)
