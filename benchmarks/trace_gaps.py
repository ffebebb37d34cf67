"""Where a GPU stream sits idle in a torch.profiler chrome trace, and why.

    python benchmarks/trace_gaps.py trace.json[.gz] [--top 25]

For the busiest stream (the compute stream) every idle gap between two kernels/copies is sorted by
cause, from the launch of the kernel that ends the gap:
- "cpu": the kernel was launched after the previous one had finished: the GPU waited for Python /
  the launching thread (the enclosing CPU op is named);
- "dep": it was launched in time but started late: it waited on another stream (an event wait, e.g.
  an offload copy) or on a synchronising call.
Prints per-stream busy time, the gap totals per cause and per enclosing op, and the largest gaps.
A profiler trace is what one needs here: per-kernel tables (key_averages) hide the idle time.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def load(path: str | Path) -> list[dict]:
    p = Path(path)
    raw = gzip.open(p, "rt").read() if p.suffix == ".gz" else p.read_text()
    data = json.loads(raw)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(events: list[dict], top: int = 25, min_gap_us: float = 5.0) -> str:
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS]
    if not gpu:
        return "no GPU events in the trace"
    # runtime launches (torch ops) and driver launches (cuLaunchKernelEx: Triton, cuBLASLt's nvjet kernels)
    launches = {e["args"]["correlation"]: e for e in events if e.get("ph") == "X"
                and e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    cpu_ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function")
                      and e.get("dur", 0) > 0), key=lambda e: e["ts"])
    starts = [e["ts"] for e in cpu_ops]
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"]

    by_stream: dict = defaultdict(list)
    for e in gpu:
        by_stream[e["args"].get("stream", -1)].append(e)
    lines = []
    t0 = min(e["ts"] for e in gpu)
    t1 = max(e["ts"] + e["dur"] for e in gpu)
    lines.append(f"GPU window {(t1 - t0) / 1e3:.1f} ms")
    for s, evs in sorted(by_stream.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        busy = sum(e["dur"] for e in evs)
        kinds = defaultdict(float)
        for e in evs:
            kinds[e["cat"]] += e["dur"]
        kinds_s = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in sorted(kinds.items()))
        lines.append(f"stream {s}: busy {busy / 1e3:.1f} ms in {len(evs)} events ({kinds_s})")
    main = max(by_stream.values(), key=lambda evs: sum(e["dur"] for e in evs))
    main.sort(key=lambda e: e["ts"])

    def enclosing(ts: float) -> str:
        """Innermost (latest-starting) CPU op that contains ts, on any thread."""
        i = bisect.bisect_right(starts, ts)
        best = None
        for e in reversed(cpu_ops[max(0, i - 400):i]):
            if e["ts"] + e["dur"] >= ts:
                best = e["name"]
                break
        return best or "-"

    gaps = []
    small = [0.0, 0]  # gaps under min_gap_us: a CUDA graph's node-to-node latency lives here
    for prev, nxt in zip(main, main[1:]):
        end = prev["ts"] + prev["dur"]
        gap = nxt["ts"] - end
        if gap < min_gap_us:
            if gap > 0:
                small[0] += gap
                small[1] += 1
            continue
        launch = launches.get(nxt["args"].get("correlation"))
        lts = launch["ts"] if launch else None
        cause = "cpu" if lts is not None and lts > end else "dep"
        where = enclosing(lts if cause == "cpu" else end)
        gaps.append((gap, cause, where, prev["name"][:60], nxt["name"][:60], (end - t0) / 1e3))
    total = defaultdict(float)
    per_op = defaultdict(float)
    for g, cause, where, *_ in gaps:
        total[cause] += g
        per_op[(cause, where)] += g
    lines.append(f"compute-stream idle: {sum(total.values()) / 1e3:.1f} ms in {len(gaps)} gaps >= {min_gap_us} us "
                 f"(cpu-bound {total['cpu'] / 1e3:.1f} ms, waiting on a dependency {total['dep'] / 1e3:.1f} ms)")
    lines.append(f"  + {small[0] / 1e3:.1f} ms in {small[1]} gaps under {min_gap_us} us (kernel-to-kernel latency)")
    lines.append("idle by cause and enclosing CPU op:")
    for (cause, where), g in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {g / 1e3:8.2f} ms  {cause}  {where[:90]}")
    lines.append("largest gaps (ms, cause, at ms, after -> before, enclosing op):")
    for g, cause, where, a, b, at in sorted(gaps, key=lambda x: -x[0])[:top]:
        lines.append(f"  {g / 1e3:7.2f} {cause} @{at:8.1f}  {a} -> {b}  [{where[:60]}]")
    slow = defaultdict(lambda: [0.0, 0])
    for e in runtime:
        slow[e["name"]][0] += e["dur"]
        slow[e["name"]][1] += 1
    lines.append("CUDA runtime calls by total CPU time (ms, calls):")
    for name, (d, n) in sorted(slow.items(), key=lambda kv: -kv[1][0])[:12]:
        lines.append(f"  {d / 1e3:8.2f} {n:6d}  {name}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print(summarize(load(args.trace), args.top))


if __name__ == "__main__":
    main()
