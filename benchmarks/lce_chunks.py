"""Fused linear cross-entropy: time and extra memory by rows per chunk (Llama-3.1-8B head, 4,095 rows).

    python benchmarks/lce_chunks.py        # H200

The kernel picks ~128 MiB of bf16 logits per chunk (512 rows at vocab 128,256). Each setting runs the
loss with its gradient (computed inside the forward) 10 times after a warm-up, timed with CUDA
events (dequant.py's timer); extra memory is the allocator peak above the inputs. Session 7: 13.2,
13.1, 13.0 and 13.0 ms at 512, 1024, 2048 and 4096 rows (314 to 1,035 MiB): the chunk size is not a lever.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dequant import timed  # noqa: E402

from tunery.kernels.cross_entropy import linear_cross_entropy  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("lce_chunks.py needs CUDA")
    torch.manual_seed(0)
    n, hidden, vocab = 4095, 4096, 128256
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    h = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, vocab, (n,), device="cuda")
    res = {}
    for rows in (512, 1024, 2048, 4096):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = 1e3 * timed(lambda rows=rows: linear_cross_entropy(h, w, y, chunk_size=rows), 10, True)
        res[rows] = {"ms": round(ms, 3),
                     "extra_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)}
        print(f"{rows:5d} rows per chunk: {res[rows]['ms']:.2f} ms, +{res[rows]['extra_mib']:.0f} MiB", flush=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "lce_chunks.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
