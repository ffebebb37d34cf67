"""Batched greedy generation: Tunery's engine against transformers' generate, same model, same GPU.

Random-weight models of real shapes are built locally (no downloads); both stacks run the very same
weights on the same left-padded prompts, every row generates exactly --new-tokens tokens, and the
warm-up (CUDA graph capture, compilation) is not timed. Reported: tokens/s of each, the speedups,
and how often the two greedy continuations agree (bf16 ties may differ on random weights).

    python benchmarks/generate.py                       # GPU: SmolLM2-135M and Llama-3.2-1B shapes, batch 1/8/32
    python benchmarks/generate.py --models llama-3.2-1b --batches 32 --hf-static
    python benchmarks/generate.py --cpu-smoke           # a tiny model on CPU, seconds

Results go to $OUT/generate.json when OUT is set (else ./generate.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
                         tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512),
}


def build_models(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(transformers model, Tunery model) sharing one set of random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from tunery.models import build_own

    kw = dict(SHAPES[shape])
    cls = Qwen2Config if shape.startswith("qwen") else LlamaConfig
    cfg = cls(**kw, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    hf.eval()
    state = {k: v for k, v in hf.state_dict().items()}
    ours = build_own(cfg, dtype, device, state)  # assign=True: the same tensors, no second copy
    ours.eval()
    return hf, ours, cfg


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_hf(hf, prompts, new_tokens: int, device, static: bool = False) -> list[list[int]]:
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2,
              eos_token_id=None, temperature=None, top_p=None, top_k=None)
    if static:
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
    return out[:, t:].tolist()


def timed(fn, device, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's tokens that agree up to the first difference."""
    fr = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        fr.append(n / max(1, len(x)))
    return sum(fr) / max(1, len(fr))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-3.2-1b"], choices=sorted(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--compile", action="store_true", help="also time Tunery with torch.compile of the decode step")
    ap.add_argument("--hf-static", action="store_true", help="also time transformers with its static cache")
    ap.add_argument("--no-eager", action="store_true", help="skip Tunery without CUDA graphs")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, a few tokens (checks the script runs)")
    args = ap.parse_args(argv)

    from tunery.generate import Generator, SamplingParams

    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.models, args.batches, args.new_tokens, args.prompt_len, args.repeats = ["tiny"], [2], 8, 12, 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: run with --cpu-smoke, or on a GPU machine", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
        torch.backends.cuda.matmul.allow_tf32 = True

    import transformers

    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "dtype": str(dtype),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "target": "tunery >= 2x hf at batch 32",
              "results": []}
    for shape in args.models:
        hf, ours, cfg = build_models(shape, device, dtype)
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        engines = {"tunery": Generator(ours, stop_ids=[], pad_id=2, cuda_graphs=device.type == "cuda",
                                       static_cache=True)}
        if not args.no_eager:
            engines["tunery_eager"] = Generator(ours, stop_ids=[], pad_id=2, cuda_graphs=False)
        if args.compile and device.type == "cuda":
            engines["tunery_compile"] = Generator(ours, stop_ids=[], pad_id=2, cuda_graphs=True, compile=True)
        for b in args.batches:
            prompts = make_prompts(b, args.prompt_len, cfg.vocab_size)
            row: dict = {"model": shape, "batch": b, "params_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1)}
            outs = {}
            for name, eng in engines.items():
                eng.generate(prompts, params)  # warm-up: capture / compile
                t, res = timed(partial(eng.generate, prompts, params), device, args.repeats)
                outs[name] = [r.token_ids for r in res]
                row[f"{name}_tok_s"] = round(b * args.new_tokens / t, 1)
                row[f"{name}_cuda_graph"] = eng.last_stats.cuda_graph
            hf_variants = [("hf", False)] + ([("hf_static", True)] if args.hf_static else [])
            for name, static in hf_variants:
                run_hf(hf, prompts, min(8, args.new_tokens), device, static)  # warm-up
                t, res = timed(partial(run_hf, hf, prompts, args.new_tokens, device, static), device, args.repeats)
                outs[name] = res
                row[f"{name}_tok_s"] = round(b * args.new_tokens / t, 1)
            row["speedup_vs_hf"] = round(row["tunery_tok_s"] / row["hf_tok_s"], 2)
            if "hf_static_tok_s" in row:
                row["speedup_vs_hf_static"] = round(row["tunery_tok_s"] / row["hf_static_tok_s"], 2)
            row["greedy_agreement_vs_hf"] = round(agreement(outs["tunery"], outs["hf"]), 3)
            if device.type == "cuda":
                row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            report["results"].append(row)
            print(json.dumps(row), flush=True)
        hf = ours = engines = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    at32 = [r["speedup_vs_hf"] for r in report["results"] if r["batch"] == 32]
    report["min_speedup_at_batch_32"] = min(at32) if at32 else None
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "generate.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out_dir / 'generate.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
