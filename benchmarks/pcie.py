"""Host <-> GPU copy bandwidth into differently pinned host buffers, alone and beside GEMMs.

    python benchmarks/pcie.py          # CUDA only

Why: activation offload ("activations" strategy, train/activations.py) is bounded by how many bytes
the copy engine moves while a forward computes. This checks whether the way the host buffers are
pinned (PinnedPool's cudaHostRegister of plain memory, torch's cudaHostAlloc, or registered memory
advised to use huge pages), a second copy stream, or GEMMs running at the same time change the rate.
On an H200 (session 6) every combination gave 54.6-55.0 GB/s each way (results/pcie_h200_s6b.log).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MIB = 1 << 20
COPIES, SIZE = 48, 32 * MIB
MADV_HUGEPAGE = 14


def pool_buffers() -> list[torch.Tensor]:
    from tunery.train.activations import PinnedPool

    pool = PinnedPool()
    return [pool.get(SIZE) for _ in range(COPIES)]


def torch_pinned() -> list[torch.Tensor]:
    return [torch.empty(SIZE, dtype=torch.uint8, pin_memory=True) for _ in range(COPIES)]


def hugepage_registered() -> list[torch.Tensor]:
    libc = ctypes.CDLL("libc.so.6")
    bufs = []
    for _ in range(COPIES):
        m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(SIZE), MADV_HUGEPAGE)
        t = torch.frombuffer(m, dtype=torch.uint8)  # keeps m alive
        t.fill_(0)
        torch.cuda.cudart().cudaHostRegister(t.data_ptr(), SIZE, 0)
        bufs.append(t)
    return bufs


def rate(bufs: list[torch.Tensor], streams: int, gemm: bool, to_host: bool) -> float:
    """GB/s of COPIES copies spread over `streams` side streams (GEMMs queued on the main one)."""
    dev = torch.device("cuda")
    src = [torch.empty(SIZE, dtype=torch.uint8, device=dev) for _ in range(8)]
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ss = [torch.cuda.Stream() for _ in range(streams)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, b in enumerate(bufs):
        with torch.cuda.stream(ss[i % streams]):
            (b.copy_(src[i % 8], non_blocking=True) if to_host else src[i % 8].copy_(b, non_blocking=True))
    if gemm:
        for _ in range(60):
            a @ a
    for s in ss:
        s.synchronize()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return COPIES * SIZE / dt / 1e9


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("pcie.py needs a CUDA GPU")
    for name, make in (("register (PinnedPool)", pool_buffers), ("torch pin_memory", torch_pinned),
                       ("register + huge pages", hugepage_registered)):
        bufs = make()
        for streams in (1, 2):
            for gemm in (False, True):
                best = max(rate(bufs, streams, gemm, True) for _ in range(2))
                print(f"{name:22s} to host, streams={streams} gemm={gemm}: {best:5.1f} GB/s", flush=True)
        best = max(rate(bufs, 1, True, False) for _ in range(2))
        print(f"{name:22s} to GPU,  streams=1 gemm=True: {best:5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
