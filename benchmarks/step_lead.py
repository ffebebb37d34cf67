"""How far the CPU queues ahead of the GPU in a Tunery QLoRA step (Llama-3.1-8B shape, 2 x 2048).

    python benchmarks/step_lead.py [--steps 6]

A CUDA event is recorded at each phase boundary (forward, backward, optimizer) and stamped with the
CPU clock when it is queued. The GPU time of each event minus its CPU time is the lead: how much
queued work the GPU still had when the CPU got there. A lead that never reaches zero means the GPU
never waited for the CPU (the step is GPU-bound); a lead near zero at a boundary means a sync or a
CPU-bound phase. Also prints the main thread's CPU time per step (the backward runs on autograd's
own thread and is not in it) and the syncs torch.cuda.set_sync_debug_mode reports in one step.
A profiler trace cannot answer this: it slows the CPU 1.3-2x and makes every phase look CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import memory as M
import torch
from shapes import LLAMA_8B


class Marks:
    """CUDA events stamped with the CPU clock when queued, from one reference point (also block_lead.py's)."""

    def __init__(self):
        self.marks: list[tuple[float, torch.cuda.Event, str]] = []
        self.ref = torch.cuda.Event(enable_timing=True)
        self.t0 = time.perf_counter()
        self.ref.record()

    def __call__(self, name: str) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.marks.append((time.perf_counter(), e, name))

    def rows(self) -> list[tuple[str, float, float]]:
        """(name, CPU ms, GPU ms) of every mark, once the GPU is done."""
        return [(name, (tc - self.t0) * 1e3, self.ref.elapsed_time(e)) for tc, e, name in self.marks]


def setup(overrides: dict | None = None, warmup: int = 3):
    """memory.py's tunery_act QLoRA step (8B shape, 2 x 2048), its optimizer and a batch maker, after
    `warmup` steps."""
    from tunery.train.loop import freeze_long_lived  # importable once memory put src/ on the path

    spec = M.speed_spec("tunery_act", "qlora", LLAMA_8B, 2048, 2, loss_sync="end", overrides=overrides)
    model, step, _ = M.build_tunery(spec, "cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    freeze_long_lived()  # as the trainer does

    def batch():
        return M._batch(spec, spec["model"]["vocab_size"], gen, "cuda")

    for _ in range(warmup):
        M._train_step(step, opt, None, "cuda", batch())
    torch.cuda.synchronize()
    return spec, model, step, opt, batch


def marked_steps(step, opt, batch, steps: int, mark: Marks) -> None:
    """`steps` training steps with a mark before the forward, the backward and the optimizer, and at the end."""
    for _ in range(steps):
        ids = batch()
        mark("forward")
        loss = step(ids)
        mark("backward")
        loss.backward()
        mark("optimizer")
        opt.step()
        opt.zero_grad(set_to_none=True)
    mark("end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_lead.py needs a CUDA GPU")
    _, _, step, opt, batch = setup()
    mark = Marks()
    th0 = time.thread_time()
    marked_steps(step, opt, batch, args.steps, mark)
    th1 = time.thread_time()
    torch.cuda.synchronize()
    wall = time.perf_counter() - mark.t0
    print(f"{'phase':<10} {'cpu ms':>8} {'gpu ms':>8} {'lead ms':>8}")
    for name, c, g in mark.rows():
        print(f"{name:<10} {c:8.1f} {g:8.1f} {g - c:8.1f}")
    print(json.dumps({"wall_step_ms": round(wall / args.steps * 1e3, 1),
                      "main_thread_cpu_step_ms": round((th1 - th0) / args.steps * 1e3, 1)}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        M._train_step(step, opt, None, "cuda", batch())
        torch.cuda.set_sync_debug_mode(0)
    syncs: dict[str, int] = {}
    for w in caught:
        if "prototype" not in str(w.message):
            key = f"{str(w.message)[:160]} @ {w.filename}:{w.lineno}"
            syncs[key] = syncs.get(key, 0) + 1
    print("syncs in one step:", json.dumps(syncs, indent=1) if syncs else "none reported")


if __name__ == "__main__":
    main()
