"""What is on the GPU at a QLoRA step's memory peaks (forward, loss, backward), by allocation site.

    python benchmarks/peak_breakdown.py                                  # memory.py's tunery_act settings
    python benchmarks/peak_breakdown.py --set keep_on_gpu=4 --set save_kept=3 --tag k4s3

One worker with `benchmarks/memory.py`'s `tunery_act` settings (Llama-3.1-8B shape, 2 x 2048, the
planner's kept blocks); `--set` overrides them as in memory.py. After the warm-up and 10 timed steps
(tokens/s, peak) it records one more step with torch's allocator history and replays it: for each
phase the live bytes at its highest point, grouped by the Tunery / benchmark source lines that
allocated them. This is how the session-7 prefetch change was found: the last offloaded block came
back at the end of forward and sat on the GPU through the loss and the kept blocks' backward.
Output: stdout and, when OUT is set, $OUT/peak_breakdown<tag>.txt. CUDA only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory as M  # noqa: E402
import torch  # noqa: E402


def _site(event: dict) -> str:
    frames = [f for f in event.get("frames", []) if "tunery" in f["filename"] or "benchmarks" in f["filename"]]
    return " <- ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in frames[:3]) or "?"


def _phases(events: list[dict]) -> list[str]:
    """forward until the loss allocates, loss until a backward allocates, then backward."""
    phase, out = "forward", []
    for e in events:
        where = " ".join(f["filename"] + ":" + f["name"] for f in e.get("frames", []))
        if phase == "forward" and "cross_entropy.py" in where:
            phase = "loss"
        elif phase == "loss" and "backward" in where and "cross_entropy.py" not in where:
            phase = "backward"
        out.append(phase)
    return out


def record(step) -> tuple[int, list[dict]]:
    """(bytes allocated before, the allocator's events) of one call of `step` (CUDA)."""
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=500_000)
    step()
    torch.cuda.synchronize()
    events = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    return start, events


def breakdown(events: list[dict], start: int, top: int = 12, site=_site) -> list[str]:
    """Per phase: the highest live total (allocated before the trace counts as `start`) and its sites,
    named by `site(event)`."""
    phases = _phases(events)
    live: dict[int, dict] = {}
    cur, best = 0, {}
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
        if cur > best.get(phases[i], (-1, 0))[0]:
            best[phases[i]] = (cur, i)
    lines = []
    for phase, (_, i) in best.items():
        live = {}
        for e in events[: i + 1]:
            if e["action"] == "alloc":
                live[e["addr"]] = e
            elif e["action"] == "free_requested":
                live.pop(e["addr"], None)
        groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for e in live.values():
            g = groups[site(e)]
            g[0] += e["size"]
            g[1] += 1
        total = start + sum(e["size"] for e in live.values())
        lines.append(f"  {phase} peak {total / M.GiB:.3f} GiB at {site(events[i])}")
        for where, (nbytes, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"    {nbytes / 2**20:8.1f} MiB {n:4d}  {where}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    type=lambda kv: (kv.split("=", 1)[0], json.loads(kv.split("=", 1)[1])))
    ap.add_argument("--tag", default="")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("peak_breakdown.py needs CUDA")
    spec = M.speed_spec("tunery_act", "qlora", M.LLAMA_8B, 2048, 2)
    spec.update(dict(args.set))
    model, step, autocast = M.build_tunery(spec, "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    gen = torch.Generator().manual_seed(1234)
    vocab = spec["model"]["vocab_size"]

    def one():
        M._train_step(step, opt, autocast, "cuda", M._batch(spec, vocab, gen, "cuda"))

    for _ in range(spec["warmup"]):
        one()
    torch.cuda.synchronize()
    from tunery.train.loop import freeze_long_lived

    freeze_long_lived()
    t = time.perf_counter()
    for _ in range(args.steps):
        one()
    torch.cuda.synchronize()
    tok_s = args.steps * spec["batch"] * spec["seq"] / (time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated()
    start, events = record(one)
    fn = model.model.checkpoint_fn
    head = (f"keep_on_gpu {spec.get('keep_on_gpu')} save_kept {spec.get('save_kept')} save_off {spec.get('save_off')}"
            f" | {tok_s:.0f} tok/s | peak {peak / M.GiB:.3f} GiB (planner {M.predict(spec):.3f}) | at step start "
            f"{start / M.GiB:.3f} GiB | auto {getattr(fn, 'auto_report', None)}")
    text = "\n".join([head, *breakdown(events, start)])
    print(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"peak_breakdown{args.tag}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
