"""Machine load for the run page: GPU utilisation and memory when a GPU is present, CPU and RAM always.

nvidia-smi is asked first (it never creates a CUDA context in the server); psutil or /proc give CPU and RAM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from typing import Any

_lock = threading.Lock()
_cache: dict[str, Any] = {"t": 0.0, "value": None}
_cpu_prev: list | None = None


def _gpus_nvidia_smi() -> list[dict[str, Any]] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,utilization.gpu,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        try:
            util = float(parts[1])
        except ValueError:
            util = None
        try:
            gpus.append({"name": parts[0], "util": util, "mem_used": float(parts[2]) * 2**20,
                         "mem_total": float(parts[3]) * 2**20})
        except ValueError:
            continue
    return gpus


def _gpus_torch() -> list[dict[str, Any]]:
    """Only when torch is already imported with CUDA (e.g. for chat): memory, no utilisation."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        try:
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"name": torch.cuda.get_device_name(i), "util": None, "mem_used": float(total - free),
                         "mem_total": float(total)})
        except Exception:
            continue
    return gpus


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) CPU time since boot."""
    try:
        import psutil

        t = psutil.cpu_times()
        return float(t.idle + getattr(t, "iowait", 0.0)), float(sum(t))
    except ImportError:
        pass
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return float(fields[3] + (fields[4] if len(fields) > 4 else 0)), float(sum(fields))


def _cpu_percent() -> float | None:
    """Busy share of all cores since the previous sample (samples at least 0.5 s apart)."""
    global _cpu_prev
    now = time.time()
    cur = _cpu_times()
    if cur is None:
        return None
    if _cpu_prev is None:
        _cpu_prev = [now, *cur, None]
        return None
    t0, idle0, total0, last = _cpu_prev
    if now - t0 < 0.5 or cur[1] <= total0:
        return last
    pct = max(0.0, min(100.0, 100.0 * (1 - (cur[0] - idle0) / (cur[1] - total0))))
    _cpu_prev = [now, *cur, pct]
    return pct


def _ram() -> tuple[float | None, float | None]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return float(vm.total - vm.available), float(vm.total)
    except ImportError:
        pass
    try:
        info = {}
        for line in open("/proc/meminfo"):
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
        return float(info["MemTotal"] - info.get("MemAvailable", info.get("MemFree", 0))), float(info["MemTotal"])
    except (OSError, KeyError, ValueError):
        return None, None


def snapshot(max_age_s: float = 1.5) -> dict[str, Any]:
    """{t, gpus: [...], cpu_percent, ram_used, ram_total, cpu_count}, cached for a moment."""
    with _lock:
        now = time.time()
        if _cache["value"] is not None and now - _cache["t"] < max_age_s:
            return _cache["value"]
        gpus = _gpus_nvidia_smi()
        if gpus is None:
            gpus = _gpus_torch()
        used, total = _ram()
        value = {"t": now, "gpus": gpus, "cpu_percent": _cpu_percent(), "ram_used": used, "ram_total": total,
                 "cpu_count": os.cpu_count()}
        _cache.update(t=now, value=value)
        return value
