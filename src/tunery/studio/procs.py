"""Child processes for long work (train, merge, export): each in its own session, so a crash or a
Studio restart never takes the other down, and Stop reaches the whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (guards against a reused pid after a Studio restart)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces or parentheses: split after its closing one.
    rest = text[text.rfind(")") + 2:].split()
    return rest[19] if len(rest) > 19 else None


def alive(pid: int | None, start: str | None = None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if Path("/proc").is_dir():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                return False
        except (OSError, IndexError):
            return False
        if start is not None and proc_start_time(pid) != start:
            return False
    return True


def spawn(cmd: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` with stdout+stderr appended to `log_path`, in a new session (pgid == pid)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(cwd),
                                env=full_env, start_new_session=True, close_fds=True)


def signal_group(pid: int, sig: int = signal.SIGTERM) -> bool:
    """Send `sig` to the process group led by `pid`; False if it is gone."""
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        try:
            os.kill(pid, sig)
            return True
        except OSError:
            return False
