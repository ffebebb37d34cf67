"""`tunery train CONFIG --nproc N`: start N training processes on this machine through torchrun.

It runs `python -m torch.distributed.run --standalone --nproc-per-node N -m tunery train CONFIG ...`:
torchrun picks a free port for the rendezvous, sets RANK / LOCAL_RANK / WORLD_SIZE, and every process
runs the ordinary `tunery train`. Across machines, call torchrun yourself (docs/distributed.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def torchrun_command(config: str | Path, overrides: list[str] | None, nproc: int,
                     shutdown_timeout_s: int = 600) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            # a stop signal lets every rank finish its step and write a checkpoint before being killed
            f"--shutdown-timeout={shutdown_timeout_s}",
            "-m", "tunery", "train", str(config), *(overrides or [])]


def launch_local(config: str | Path, overrides: list[str] | None, nproc: int) -> int:
    """Run torchrun in the foreground and return its exit status (that of the first failed rank).

    SIGINT / SIGTERM to this process reach torchrun once, which passes SIGTERM to each rank: the ranks
    finish the current step, checkpoint and exit (Studio's Stop button works the same way for N > 1).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        gpus = 0
    if gpus and nproc > gpus:
        print(f"error: --nproc {nproc} but this machine has {gpus} GPU(s); use at most one process per GPU",
              file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # own session: a Ctrl-C in the terminal reaches torchrun once (through us), not torchrun and every
    # rank at the same time (a second signal means "stop now" to a rank)
    proc = subprocess.Popen(torchrun_command(config, overrides, nproc), env=env, start_new_session=True)

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.kill()


__all__ = ["launch_local", "torchrun_command"]
