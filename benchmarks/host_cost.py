"""Host (CPU) cost of a Tunery QLoRA step (Llama-3.1-8B shape, 2 x 2048): where a step waits on the CPU.

    python benchmarks/host_cost.py [--gap] [--set key=json ...] [--steps 3]   # per phase and per block
    python benchmarks/host_cost.py --ops                                       # per op, and the launch queue

A step is as fast as the slower of the GPU and the host thread that queues its work. On an H200 the
GPU runs an 8B QLoRA step in ~295 ms power-capped, and the host needs 260-360 ms depending on the
machine (benchmarks/RESULTS.md, thirteenth session), so the host decides on some machines.

Default mode: each phase is timed from an idle GPU (synchronized first), so the host never waits on a
full launch queue and its time is its own: the forward's and the backward's host ms, the forward's per
block (block 0 carries the once-per-step work: the refresh of cached adapter casts), then the
allocator's device calls per step in continuous training (cudaMalloc/cudaFree; a cudaFree waits for the
whole GPU). `--ops` times single ops with one spinning kernel queued ahead (each warmed up first: a
kernel's first launch loads its module, which waits for the GPU), and counts how many launches the
queue takes before one blocks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def phases(over: dict, steps: int) -> dict:
    from step_lead import setup

    spec, model, step, opt, batch = setup(over, warmup=8)
    fn = model.model.checkpoint_fn
    plain = type(fn).__call__
    marks: list[float] = []

    def marked(self, layer, x, *rest):
        marks.append(time.perf_counter())
        return plain(self, layer, x, *rest)

    type(fn).__call__ = marked
    try:
        fwd, bwd, blocks = [], [], []
        for _ in range(steps):
            ids = batch()
            torch.cuda.synchronize()
            marks.clear()
            t0 = time.perf_counter()
            loss = step(ids)
            t1 = time.perf_counter()
            blocks.append([(b - a) * 1e3 for a, b in zip(marks, marks[1:] + [t1])])
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t3 - t2) * 1e3)
        keys = ("num_device_alloc", "num_device_free", "num_alloc_retries")
        before = torch.cuda.memory_stats()
        t = time.perf_counter()
        for _ in range(steps):
            loss = step(batch())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps * 1e3
        after = torch.cuda.memory_stats()
    finally:
        type(fn).__call__ = plain
    rest = [b for row in blocks for b in row[1:-1]]
    return {"spec": {k: spec.get(k) for k in ("keep_on_gpu", "save_kept", "stream_weights", "weights_mode")},
            "forward_host_ms": [round(v, 1) for v in fwd], "backward_host_ms": [round(v, 1) for v in bwd],
            "block0_ms": [round(row[0], 2) for row in blocks],
            "block_ms_median": round(statistics.median(rest), 2), "block_ms_range": [round(min(rest), 2), round(max(rest), 2)],
            "last_block_and_loss_ms": [round(row[-1], 2) for row in blocks],
            "continuous_ms_per_step": round(wall, 1),
            "allocator_device_calls_per_step": {k: (after.get(k, 0) - before.get(k, 0)) / steps for k in keys}}


def ops() -> dict:
    from tunery.kernels.rmsnorm import rms_norm_forward

    bf = torch.bfloat16
    n, h = 4096, 4096
    xn = torch.randn(n, h, device="cuda", dtype=bf)
    dy = torch.randn(n, 6144, device="cuda", dtype=bf)
    xa = torch.randn(n, 48, device="cuda", dtype=bf)
    a = torch.randn(48, h, device="cuda", dtype=bf)
    w = torch.ones(h, device="cuda", dtype=bf)
    side = torch.cuda.Stream()

    def host_us(f, calls=200):
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        torch.cuda._sleep(400_000_000)  # one kernel spinning ~0.2 s: the timed launches queue behind it
        t = time.perf_counter()
        for _ in range(calls):
            f()
        dt = (time.perf_counter() - t) / calls * 1e6
        torch.cuda.synchronize()
        return round(dt, 1)

    out = {"mm [6144xN]@[Nx16] (LoRA B grad)": host_us(lambda: dy.t() @ xa[:, :16]),
           "mm out_dtype=fp32": host_us(lambda: torch.mm(dy.t(), xa[:, :16], out_dtype=torch.float32)),
           "mm [NxH]@[Hx48] (x A^T)": host_us(lambda: xn @ a.t()),
           "addmm_": host_us(lambda: xa.addmm_(xn, a.t())),
           "mul_": host_us(lambda: xa.mul_(1.0)),
           "slice copy_": host_us(lambda: xn[:, :48].copy_(xa)),
           "torch.empty": host_us(lambda: torch.empty(n, h, device="cuda", dtype=bf)),
           "split into 3": host_us(lambda: xn.split([1024, 1024, 2048])),
           "rms_norm_forward (a Triton launch)": host_us(lambda: rms_norm_forward(xn, w, 1e-5, 0.0, True)),
           "Event().record()": host_us(lambda: torch.cuda.Event().record()),
           "Stream.wait_stream": host_us(lambda: side.wait_stream(torch.cuda.current_stream())),
           "torch.cuda.current_stream": host_us(torch.cuda.current_stream),
           "torch.block_diag of 3": host_us(lambda: torch.block_diag(a[:16, :16], a[16:32, :16], a[32:, :16]))}
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    depth = 0
    while depth < 10_000:
        t = time.perf_counter()
        xa.mul_(1.0)
        depth += 1
        if time.perf_counter() - t > 0.005:  # this launch waited for room in the queue
            break
    torch.cuda.synchronize()
    out["launch_queue_depth"] = depth
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gap", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    ap.add_argument("--ops", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_cost.py needs a CUDA GPU")
    if args.ops:
        import memory  # noqa: F401  (puts src/ on the path)

        print(json.dumps(ops()))
        return
    over = {"gap": True} if args.gap else {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        over[key] = json.loads(value)
    print(json.dumps(phases(over, args.steps)))


if __name__ == "__main__":
    main()
