"""What each GGUF quant type costs the embedded SmolLM2-135M-Instruct: file size, export time, and the
model's perplexity on held-out GSM8K answers when transformers reads the file back (gguf_file=),
next to the fp32 model's. With `--llama-cpp` (needs llama-cpp-python, built from source by pip), also
llama.cpp's own perplexity of each file, and Tunery's k-quants set against llama.cpp's quantizer.

Besides Tunery's types (f16, q8_0, q6_k, q5_k_m, q4_k_m) the uniform Q4_0 / Q4_1 / Q5_0 files that the `gguf`
package can write are measured too. Read them with care: the embedded model ships as a Q4_1 GGUF (Q8_0
embedding), so its block weights sit on Q4_1's grid and a Q4_1 file of them is lossless; every other type
re-quantizes them. SmolLM2's rows (576) do not fit k-quant blocks of 256 either, so most of its q4_k_m
tensors fall back to Q5_0 (down_proj, 1536 wide, is Q4_K / Q6_K). What this shows is that llama.cpp reads
each file as transformers does; how the types rank on ordinary weights is in tests/test_export_kquants.py.

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


def weight_errors(types: list[str]) -> dict[str, float]:
    """Relative RMS error of each type's 2-D encoding on off-grid, weight-like rows (Student-t, 5 degrees
    of freedom, 1 in 1000 values 8x larger), 1024 x 4096."""
    from gguf.quants import dequantize

    from tunery.export import gguf_writer

    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(5.0).sample((1024, 4096)) * 0.02
    w[torch.rand(w.shape, generator=g) < 1e-3] *= 8
    out = {}
    for q in types:
        qtype = gguf_writer.tensor_type("blk.1.attn_q.weight", q, 32, tuple(w.shape), False)
        back = torch.from_numpy(dequantize(gguf_writer._encode(w, qtype), qtype)).float()
        out[q] = ((back - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()
    return out


def _gguf_arrays(path: Path) -> dict[str, tuple]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {t.name: (t.tensor_type, dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]))
            for t in GGUFReader(str(path)).tensors}


def against_llama_cpp(folder: Path, tag: str, tmp: Path) -> list[dict]:
    """Tunery's k-quants next to llama.cpp's own quantizer (llama_model_quantize) run on Tunery's f32
    file of the same model: the tensor types each picks, the file sizes, and the relative RMS error of all
    matrices against the f32 values."""
    import llama_cpp

    from tunery.export import gguf_from_folder

    ref = _gguf_arrays(gguf_from_folder(folder, tmp / "f32.gguf", "f32"))
    mats = [n for n, (_, a) in ref.items() if a.ndim == 2]
    rows = []
    for quant, ftype in (("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M), ("q5_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M),
                         ("q6_k", llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K)):
        ours_path = gguf_from_folder(folder, tmp / f"ours-{quant}.gguf", quant)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, os.cpu_count() or 1
        theirs_path = tmp / f"llama-cpp-{quant}.gguf"
        if llama_cpp.llama_model_quantize(str(tmp / "f32.gguf").encode(), str(theirs_path).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {tmp / 'f32.gguf'}")
        ours, theirs = _gguf_arrays(ours_path), _gguf_arrays(theirs_path)

        def rel(d):
            num = sum(float(((d[n][1] - ref[n][1]) ** 2).sum()) for n in mats)
            return math.sqrt(num / sum(float((ref[n][1] ** 2).sum()) for n in mats))

        rows.append({"model": tag, "quant": quant, "same_type": sum(ours[n][0] == theirs[n][0] for n in ref),
                     "tensors": len(ref), "rel_rmse": rel(ours), "llama_cpp_rel_rmse": rel(theirs),
                     "bytes": ours_path.stat().st_size, "llama_cpp_bytes": theirs_path.stat().st_size})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def weight_like_llama(folder: Path) -> Path:
    """A random Llama (8 layers, 1024 wide, GQA 4) whose matrices are Student-t like trained weights and
    whose rows fit k-quant blocks; tokenizer: a small byte-level BPE trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts(40), trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.distributions.StudentT(5.0).sample(p.shape) * 0.02)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m,q5_0,q4_1,q4_0")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp's perplexity (needs llama_cpp)")
    args = ap.parse_args()

    from gguf import GGMLQuantizationType, LlamaFileType
    from transformers import AutoModelForCausalLM

    from tunery.export import gguf_writer
    from tunery.models import load_model
    from tunery.models.source import resolve_model_path

    for name, t in UNIFORM.items():  # not offered by the CLI: only measured here
        gguf_writer.QUANT_TYPES[name] = (GGMLQuantizationType[t], LlamaFileType[f"MOSTLY_{t}"])
    errs = weight_errors(args.types.split(","))
    print("relative RMS error on weight-like rows (the main type of each):",
          ", ".join(f"{q} {e:.4f}" for q, e in errs.items()), flush=True)
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
            row["weight_rel_rmse"] = errs[q]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del hf
            out.unlink()
    versus = []
    if args.llama_cpp:
        with tempfile.TemporaryDirectory() as tmp:
            versus += against_llama_cpp(weight_like_llama(Path(tmp) / "hf"), "random Llama, 1024 wide, Student-t",
                                        Path(tmp))
        with tempfile.TemporaryDirectory() as tmp:
            versus += against_llama_cpp(folder, "SmolLM2-135M-Instruct", Path(tmp))
    dest = Path(os.environ.get("OUT", ".")) / "gguf_quality.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"files": rows, "against_llama_cpp": versus}, indent=2))
    print(f"{'type':<12}{'MiB':>8}{'ppl':>9}{'vs fp32':>9}{'llama.cpp':>11}")
    for r in rows:
        size = f"{r['bytes'] / 2**20:.1f}" if r["bytes"] else "-"
        lc = f"{r['llama_cpp_ppl']:.4f}" if "llama_cpp_ppl" in r else "-"
        print(f"{r['type']:<12}{size:>8}{r['ppl']:>9.4f}{r.get('ppl_vs_fp32', 1.0):>9.4f}{lc:>11}")
    for v in versus:
        print(f"{v['model']}, {v['quant']}: the same tensor type as llama.cpp for {v['same_type']}/{v['tensors']}, "
              f"{v['bytes'] / 2**20:.2f} MiB (llama.cpp {v['llama_cpp_bytes'] / 2**20:.2f}), relative RMS error "
              f"{v['rel_rmse']:.5f} (llama.cpp {v['llama_cpp_rel_rmse']:.5f})")


if __name__ == "__main__":
    main()
