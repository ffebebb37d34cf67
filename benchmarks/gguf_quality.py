"""What each GGUF quant type costs the embedded SmolLM2-135M-Instruct: file size, export time, and the
model's perplexity on held-out GSM8K answers when transformers reads the file back (gguf_file=),
next to the fp32 model's. With `llama_cpp` importable (llama-cpp-python), llama.cpp's own perplexity
of each file too.

Besides Tunery's types (f16, q8_0, q6_k, q4_k_m) the uniform Q4_0 / Q4_1 / Q5_0 files that the `gguf`
package can write are measured as the baseline a k-quant mix has to beat.

    python benchmarks/gguf_quality.py [--rows 40] [--types f16,q8_0,q6_k,q4_k_m,q4_0] [--llama-cpp]

Results go to $OUT/gguf_quality.json when OUT is set (else ./gguf_quality.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

UNIFORM = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0"}  # baselines, written through gguf's quantize


def texts(rows: int) -> list[str]:
    """The last `rows` GSM8K problems of the bundled sample (the quickstart trains on the first ones)."""
    lines = (ROOT / "examples/data/gsm8k_sample.jsonl").read_text().splitlines()[-rows:]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in map(json.loads, lines)]


def nll(logits_of, ids: list[list[int]]) -> float:
    """Mean next-token negative log-likelihood over all rows."""
    total, count = 0.0, 0
    for row in ids:
        x = torch.tensor([row])
        with torch.no_grad():
            logp = torch.log_softmax(logits_of(x)[0, :-1].float(), -1)
        total -= logp.gather(-1, x[0, 1:, None]).sum().item()
        count += len(row) - 1
    return total / count


def llama_cpp_nll(path: Path, ids: list[list[int]]) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=os.cpu_count())
    total, count = 0.0, 0
    for row in ids:
        llm.reset()
        llm.eval(row)
        logits = torch.tensor(llm.scores[:len(row)])
        logp = torch.log_softmax(logits[:-1], -1)
        total -= logp.gather(-1, torch.tensor(row[1:])[:, None]).sum().item()
        count += len(row) - 1
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--types", default="f16,q8_0,q6_k,q4_k_m,q5_0,q4_1,q4_0")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp's perplexity (needs llama_cpp)")
    args = ap.parse_args()

    from gguf import GGMLQuantizationType, LlamaFileType
    from transformers import AutoModelForCausalLM

    from tunery.export import gguf_writer
    from tunery.models import load_model
    from tunery.models.source import resolve_model_path

    for name, t in UNIFORM.items():  # not offered by the CLI: only measured here
        gguf_writer.QUANT_TYPES[name] = (GGMLQuantizationType[t], LlamaFileType[f"MOSTLY_{t}"])
    lm = load_model("default")
    folder = Path(resolve_model_path("default"))
    ids = [lm.tokenizer(t).input_ids for t in texts(args.rows)]
    base = nll(lambda x: lm.model.logits(lm.model(x)), ids)
    rows = [{"type": "fp32 model", "bytes": None, "nll": base, "ppl": math.exp(base)}]
    print(f"{len(ids)} rows, {sum(map(len, ids))} tokens; fp32 model: ppl {math.exp(base):.4f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for q in args.types.split(","):
            t0 = time.perf_counter()
            out = gguf_writer.gguf_from_folder(folder, Path(tmp) / f"smol-{q}.gguf", q)
            dt = time.perf_counter() - t0
            hf = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=out.name, dtype=torch.float32).eval()
            v = nll(lambda x, hf=hf: hf(x).logits, ids)
            row = {"type": q, "bytes": out.stat().st_size, "export_s": round(dt, 1), "nll": v, "ppl": math.exp(v),
                   "ppl_vs_fp32": math.exp(v - base)}
            if args.llama_cpp:
                lv = llama_cpp_nll(out, ids)
                if lv is not None:
                    row.update(llama_cpp_ppl=math.exp(lv), llama_cpp_vs_fp32=math.exp(lv - base))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del hf
            out.unlink()
    dest = Path(os.environ.get("OUT", ".")) / "gguf_quality.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(rows, indent=2))
    print(f"{'type':<12}{'MiB':>8}{'ppl':>9}{'vs fp32':>9}{'llama.cpp':>11}")
    for r in rows:
        size = f"{r['bytes'] / 2**20:.1f}" if r["bytes"] else "-"
        lc = f"{r['llama_cpp_ppl']:.4f}" if "llama_cpp_ppl" in r else "-"
        print(f"{r['type']:<12}{size:>8}{r['ppl']:>9.4f}{r.get('ppl_vs_fp32', 1.0):>9.4f}{lc:>11}")


if __name__ == "__main__":
    main()
