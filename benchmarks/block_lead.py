"""Per-block GPU time and CPU lead, forward and backward, of a Tunery QLoRA step (Llama-3.1-8B shape, 2 x 2048).

    python benchmarks/block_lead.py [--gap] [--set key=json ...] [--steps 3] [--profile torch|python]

step_lead.py answers "does the GPU ever wait for the CPU?" per phase; this answers it per decoder block.
A CUDA event is queued before each block's forward and, through a hook on its output, when its backward
starts; each is stamped with the CPU clock when queued. dur: GPU time to the next mark. lead: the
event's GPU time minus its CPU time (both from one reference point), i.e. how much queued work the GPU
still had when the CPU got there. A lead that falls block after block means the CPU takes longer per
block than the GPU: that stretch is CPU-bound. A flat lead is the launch queue full (GPU-bound).
`--set` takes memory.py's overrides (`--set keep_on_gpu=10`); `--gap` is memory.py's `--set gap=true`.
Prints one JSON line; `--profile` adds torch.profiler tables (by CPU, then by GPU time) or a cProfile
listing of two more steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from step_lead import Marks, marked_steps, setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gap", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    ap.add_argument("--profile", choices=["torch", "python"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("block_lead.py needs a CUDA GPU")
    over = {"gap": True} if args.gap else {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        over[key] = json.loads(value)
    spec, model, step, opt, batch = setup(over, warmup=8)  # save_mlp "auto" decides at the fifth forward
    fn = model.model.checkpoint_fn
    mark = Marks()
    plain = type(fn).__call__

    def timed_call(self, layer, x, *rest):
        idx = self.layer_index.get(id(layer), 0)
        mark(f"f{idx}")
        y = plain(self, layer, x, *rest)
        if y.requires_grad:
            y.register_hook(lambda g, i=idx: mark(f"b{i}"))
        return y

    type(fn).__call__ = timed_call
    try:
        marked_steps(step, opt, batch, args.steps, mark)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - mark.t0) / args.steps * 1e3
    finally:
        type(fn).__call__ = plain
    rows = mark.rows()
    last = max(i for i, r in enumerate(rows) if r[0] == "forward")  # the last step's marks
    seg = rows[last:]
    out = {"spec": {k: spec.get(k) for k in ("keep_on_gpu", "save_kept", "stream_weights", "weights_mode")},
           "auto": fn.auto_report, "wall_step_ms": round(wall, 1),
           "rows": [[n, round(nxt[2] - g, 2), round(g - c, 1)] for (n, c, g), nxt in zip(seg, seg[1:])]}
    print(json.dumps(out))
    if args.profile:
        _profile(args.profile, step, opt, batch)


def _profile(kind: str, step, opt, batch) -> None:
    def two_steps():
        for _ in range(2):
            loss = step(batch())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    if kind == "torch":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            two_steps()
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=60))
        print(table.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=60))
        return
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    two_steps()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(45)
    print(buf.getvalue())


if __name__ == "__main__":
    main()
