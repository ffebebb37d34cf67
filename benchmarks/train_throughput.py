"""Training throughput and peak memory: transformers+peft vs (+Liger) vs Tunery's decoder and kernels.

    python benchmarks/train_throughput.py                 # H200: both scenarios, every stack
    python benchmarks/train_throughput.py --smoke         # CPU smoke run: tiny shapes, a few steps
    python benchmarks/train_throughput.py --only lora8b --stacks a,c --steps 20

Scenarios (random weights, built on the meta device then materialised with to_empty; nothing is
downloaded), bf16, sequence 2048, identical token data and identical initial weights in every stack:

- lora8b: Llama-3.1-8B shape, LoRA r=16 alpha=32 on all seven linears, micro-batch 2;
- full1b: Llama-3.2-1B shape (tied embeddings), full fine-tune, micro-batch 4 (stacks a and c).

Stacks, each in its own subprocess:

- a: transformers + peft, SDPA attention, gradient checkpointing (non-reentrant), model(..., labels);
- b: a + Liger kernels (apply_liger_kernel_to_llama: RMSNorm, RoPE, SwiGLU, fused linear CE), if importable;
- c: Tunery: own decoder with its fused kernels (fused norm+LoRA projections, Triton RoPE/SwiGLU,
  varlen FlashAttention), loss = linear_cross_entropy(hidden, head_weight, shifted labels) / n_tokens.
  With a memory budget (lora8b: the peak of stack a), c keeps as many MLP activations as fit and
  recomputes the rest (set_mlp_recompute); if even that does not fit, it checkpoints whole blocks.

All stacks use torch.optim.AdamW(fused=True) on the trainable parameters. Reported: tokens/s, peak
GiB (torch.cuda.max_memory_allocated over the steady-state steps), MFU against a bf16 matmul ceiling
measured here (model flops: 6N + attention for full fine-tuning, 4N + attention for LoRA, since the
frozen base weights need no weight gradients; no recomputation counted), the ratios c/a and c/b, and
whether the first three losses of a and c agree within 1%. Results go to $OUT/train_throughput.json
when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from shapes import LINEARS, LLAMA_1B, LLAMA_8B, TINY  # noqa: E402


def scenarios(smoke: bool) -> dict[str, dict]:
    if smoke:
        return {
            "lora8b": dict(model=TINY, lora=True, batch=2, seq=64, stacks="abc"),
            "full1b": dict(model=dict(TINY, tie_word_embeddings=True), lora=False, batch=2, seq=64, stacks="ac"),
        }
    return {
        "lora8b": dict(model=LLAMA_8B, lora=True, batch=2, seq=2048, stacks="abc"),
        "full1b": dict(model=LLAMA_1B, lora=False, batch=4, seq=2048, stacks="ac"),
    }


# ------------------------------------------------------------------------------------------- shared


def canonical(name: str) -> str:
    """One name per tensor across stacks: peft's wrappers and adapter names removed."""
    name = name.removeprefix("base_model.model.")
    name = name.replace(".base_layer.", ".")
    for ab in ("lora_A", "lora_B"):
        name = name.replace(f".{ab}.default.weight", f".{ab}")
    return name


def init_params(named, seed: int, only_lora: bool = False) -> None:
    """Deterministic per-name init, identical in every process: std 0.02 normals, ones for norms,
    LoRA A uniform(+-1/sqrt(in)), LoRA B zero."""
    import torch

    with torch.no_grad():
        for name, p in named:
            key = canonical(name)
            is_lora = ".lora_A" in key or ".lora_B" in key
            if only_lora != is_lora:
                continue
            gen = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(key.encode()))
            if key.endswith("norm.weight"):
                p.fill_(1.0)
            elif key.endswith("lora_B") or key.endswith("bias"):
                p.zero_()
            else:  # drawn in fp32 whatever p's dtype (peft keeps adapters in fp32), then rounded into p
                tmp = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                if key.endswith("lora_A"):
                    bound = 1.0 / math.sqrt(p.shape[1])
                    tmp.uniform_(-bound, bound, generator=gen)
                else:
                    tmp.normal_(0.0, 0.02, generator=gen)
                p.copy_(tmp)
                del tmp


def token_data(vocab: int, batch: int, seq: int, steps: int):
    import torch

    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (steps, batch, seq), generator=gen)


def flops_per_token(m: dict, seq: int, lora: bool) -> float:
    h, i, layers = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]
    qd = m["num_attention_heads"] * m["head_dim"]
    kvd = m["num_key_value_heads"] * m["head_dim"]
    n_lin = layers * (h * qd + 2 * h * kvd + qd * h + 3 * h * i) + m["vocab_size"] * h
    attn_fwd = layers * 2 * qd * seq  # causal: QK^T and PV over half the context on average
    return (4 if lora else 6) * n_lin + 3 * attn_fwd


def matmul_ceiling_tflops(device: str) -> float:
    import torch

    if device != "cuda":
        a = torch.randn(512, 512)
        t = time.perf_counter()
        for _ in range(5):
            a @ a
        return 5 * 2 * 512**3 / (time.perf_counter() - t) / 1e12
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(3):
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
        for _ in range(10):
            a @ b
        ev1.record()
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * n**3 / (ev0.elapsed_time(ev1) / 1e3) / 1e12)
    del a, b
    torch.cuda.empty_cache()
    return best


# ------------------------------------------------------------------------------------------ stacks


def build_hf(m: dict, lora: bool, dtype, device: str, liger: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    kw = {k: v for k, v in m.items() if k != "model_type"}
    cfg = LlamaConfig(**kw)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device=device)
    # rotary buffers were on meta: build them again in fp32 on the device
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RotaryEmbedding"):
            try:
                fresh = type(mod)(config=cfg, device=device)
            except TypeError:
                fresh = type(mod)(config=cfg).to(device)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, fresh)
    init_params(model.named_parameters(), 0)
    model.tie_weights()
    model.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEARS,
                                                 bias="none", task_type="CAUSAL_LM"))
        init_params(model.named_parameters(), 0, only_lora=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    def step(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, step


def build_tunery(m: dict, lora: bool, dtype, device: str, compile_: bool):
    import torch

    from tunery.adapters.lora import inject_lora
    from tunery.kernels.cross_entropy import linear_cross_entropy
    from tunery.models.decoder import CausalLM
    from tunery.models.fused import compile_blocks, set_fused
    from tunery.models.registry import decoder_config

    cfg = decoder_config(m)
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device=device)  # the decoder recomputes its fp32 rope frequencies itself
    model.tie_weights()
    init_params(model.named_parameters(), 0)
    if lora:
        inject_lora(model, LINEARS, r=16, alpha=32)
        init_params(model.named_parameters(), 0, only_lora=True)
    set_fused(model, True)
    if compile_:
        compile_blocks(model)
    model.train()
    state: dict = {}

    def step(ids):
        b, t = ids.shape
        if state.get("shape") != (b, t):
            state["shape"] = (b, t)
            state["pos"] = torch.arange(t, device=ids.device).expand(b, t)
            state["cu"] = torch.arange(0, b * t + 1, t, device=ids.device, dtype=torch.int32)
        hidden = model(ids, state["pos"], state["cu"], t)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        n_tokens = b * (t - 1)
        return linear_cross_entropy(hidden.reshape(b * t, -1), model.head_weight, labels.reshape(-1),
                                    softcap=cfg.final_softcap) / n_tokens

    return model, step


def _block_checkpointing(model, layers: set[int]) -> None:
    from torch.utils.checkpoint import checkpoint

    index = {id(b): i for i, b in enumerate(model.model.layers)}

    def fn(layer, *args):
        if index[id(layer)] in layers:
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    model.model.checkpoint_fn = fn if layers else None


def worker(args) -> dict:
    import torch

    sc = scenarios(args.smoke)[args.scenario]
    m, lora, batch, seq = sc["model"], sc["lora"], sc["batch"], sc["seq"]
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    res: dict = dict(scenario=args.scenario, stack=args.stack, device=device, dtype=str(dtype), batch=batch, seq=seq)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    if args.stack in ("a", "b"):
        model, step = build_hf(m, lora, dtype, device, liger=args.stack == "b")
    else:
        model, step = build_tunery(m, lora, dtype, device, args.compile)
    res["build_s"] = round(time.perf_counter() - t_build, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=cuda, foreach=None if cuda else False)
    warmup = max(args.warmup, 3)
    data = token_data(m["vocab_size"], batch, seq, warmup + args.steps)
    losses: list[float] = []

    def train_step(i):
        ids = data[i].to(device, non_blocking=True)
        loss = step(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    policy = {"mlp_recompute_layers": 0, "checkpointed_blocks": 0}
    budget = args.mem_budget
    for i in range(warmup):
        if i == warmup - 1 and cuda:
            if args.stack == "c" and budget:
                policy = fit_memory(model, m, batch * seq, budget, torch.cuda.max_memory_allocated(), dtype)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif i == 0 and args.stack == "c" and budget and cuda:
            from tunery.models.fused import set_mlp_recompute

            set_mlp_recompute(model, True)  # measure the leanest fused setting first
            res["mem_before_step_gib"] = torch.cuda.memory_allocated() / 2**30
        loss = train_step(i)
        losses.append(float(loss.item()))
    if args.stack == "c" and budget and cuda and policy.get("checkpointed_blocks") == 0:
        over = torch.cuda.max_memory_allocated() - budget
        if over > 0:  # estimate fell short: recompute a few more MLPs, run one more warmup step
            from tunery.models.fused import set_mlp_recompute

            extra = math.ceil(over / mlp_bytes(m, batch * seq, dtype))
            policy["mlp_recompute_layers"] = min(m["num_hidden_layers"], policy["mlp_recompute_layers"] + extra)
            set_mlp_recompute(model, policy["mlp_recompute_layers"])
            policy["corrected"] = True
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            train_step(0)
    res["policy"] = policy
    res["first_losses"] = losses[:3]
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + args.steps):
        loss = train_step(i)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res["last_loss"] = float(loss.item())
    res["step_s"] = dt / args.steps
    res["tokens_per_s"] = args.steps * batch * seq / dt
    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    res["flops_per_token"] = flops_per_token(m, seq, lora)
    return res


def mlp_bytes(m: dict, tokens: int, dtype) -> int:
    import torch

    return 2 * tokens * m["intermediate_size"] * (torch.finfo(dtype).bits // 8)


def fit_memory(model, m: dict, tokens: int, budget: float, peak_all: float, dtype) -> dict:
    """Choose how many MLPs recompute (and, if needed, how many blocks checkpoint) to stay under budget.

    peak_all was measured with every MLP recomputing; each MLP that keeps its activations costs
    gate + up = 2 * tokens * intermediate elements."""
    import torch

    from tunery.models.fused import set_mlp_recompute

    layers = m["num_hidden_layers"]
    per_mlp = mlp_bytes(m, tokens, dtype)
    target = budget - (48 << 20)  # the estimate is exact to a few MiB; a small margin for allocator rounding
    if peak_all <= target:
        keep = int((target - peak_all) // per_mlp)
        n_rec = max(0, layers - keep)
        set_mlp_recompute(model, n_rec)
        return {"mlp_recompute_layers": n_rec, "checkpointed_blocks": 0, "peak_all_recompute_gib": peak_all / 2**30}
    # even the leanest fused setting is over: checkpoint whole blocks too (each frees roughly the
    # per-block activations: residual, q, k, v, o, MLP input ~ tokens * (3*hidden + 2*q_dim + 2*kv_dim))
    qd = m["num_attention_heads"] * m["head_dim"]
    kvd = m["num_key_value_heads"] * m["head_dim"]
    per_block = tokens * (3 * m["hidden_size"] + 2 * qd + 2 * kvd) * (torch.finfo(dtype).bits // 8)
    n_ck = min(layers, math.ceil((peak_all - target) / per_block))
    set_mlp_recompute(model, True)
    _block_checkpointing(model, set(range(n_ck)))
    return {"mlp_recompute_layers": layers, "checkpointed_blocks": n_ck, "peak_all_recompute_gib": peak_all / 2**30}


# -------------------------------------------------------------------------------------- orchestrate


def run_worker(scenario: str, stack: str, args, budget: float | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, __file__, "--worker", scenario, stack, "--result", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr)]
        cmd += ["--smoke"] * args.smoke + ["--cpu"] * args.cpu + ["--compile"] * args.compile
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if budget:
            cmd += ["--mem-budget", str(budget)]
        env = dict(os.environ)
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if out.exists():
            res = json.loads(out.read_text())
        else:
            res = {"scenario": scenario, "stack": stack, "error": f"exit {proc.returncode}",
                   "stderr_tail": proc.stderr[-4000:]}
        res["wall_s"] = round(time.perf_counter() - t, 1)
        return res


def summarize(name: str, runs: dict[str, dict], ceiling: float) -> dict:
    out: dict = {"runs": runs}
    for r in runs.values():
        if "tokens_per_s" in r:
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (ceiling * 1e12)
    a, b, c = runs.get("a", {}), runs.get("b", {}), runs.get("c", {})
    if "tokens_per_s" in a and "tokens_per_s" in c:
        out["speed_c_over_a"] = c["tokens_per_s"] / a["tokens_per_s"]
        if a.get("peak_gib") and c.get("peak_gib"):
            out["memory_c_over_a"] = c["peak_gib"] / a["peak_gib"]
        la, lc = a.get("first_losses", []), c.get("first_losses", [])
        rel = [abs(x - y) / max(abs(x), 1e-9) for x, y in zip(la, lc)]
        out["first_losses_rel_diff"] = rel
        out["losses_agree_1pct"] = bool(rel) and max(rel) <= 0.01
    if "tokens_per_s" in b and "tokens_per_s" in c:
        out["speed_c_over_b"] = c["tokens_per_s"] / b["tokens_per_s"]
    if name == "lora8b":
        out["target"] = "c/a >= 2.2 with peak(c) <= peak(a)"
        out["target_met"] = bool(out.get("speed_c_over_a", 0) >= 2.2 and out.get("memory_c_over_a", 9) <= 1.0)
    else:
        out["target"] = "c/a >= 1.5"
        out["target_met"] = bool(out.get("speed_c_over_a", 0) >= 1.5)
    return out


def _fmt(r: dict) -> str:
    if "tokens_per_s" not in r:
        return f"  {r.get('stack')}: ERROR {r.get('error')} {r.get('stderr_tail', '')[-1500:]}"
    peak = f"{r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "n/a"
    return (f"  {r['stack']}: {r['tokens_per_s']:10.0f} tok/s  peak {peak:>10}  MFU {r.get('mfu', 0):6.1%}  "
            f"step {r['step_s'] * 1e3:7.1f} ms  losses {[round(x, 4) for x in r['first_losses']]}  "
            f"policy {r.get('policy')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU-friendly)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is present")
    ap.add_argument("--only", default="", help="comma list of scenarios: lora8b,full1b")
    ap.add_argument("--stacks", default="", help="comma list of stacks: a,b,c")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    ap.add_argument("--compile", action="store_true", help="stack c: torch.compile per decoder block")
    ap.add_argument("--no-budget", action="store_true", help="stack c: no memory budget from stack a")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--worker", nargs=2, metavar=("SCENARIO", "STACK"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--mem-budget", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        args.scenario, args.stack = args.worker
        try:
            res = worker(args)
        except Exception as e:
            res = {"scenario": args.scenario, "stack": args.stack, "error": repr(e),
                   "stderr_tail": traceback.format_exc()}
        Path(args.result).write_text(json.dumps(res))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    ceiling = matmul_ceiling_tflops(device)
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    from importlib.metadata import version as dist_version

    for mod, dist in (("transformers", "transformers"), ("peft", "peft"), ("triton", "triton"),
                      ("liger_kernel", "liger-kernel")):
        try:
            __import__(mod)  # liger_kernel has no __version__: ask the distribution metadata
            versions[mod] = dist_version(dist)
        except Exception:
            versions[mod] = None
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "versions": versions, "matmul_ceiling_tflops": ceiling, "smoke": args.smoke,
                    "steps": args.steps, "warmup": args.warmup, "scenarios": {}}
    print(f"device {report['device']}  bf16 matmul ceiling {ceiling:.1f} TFLOP/s  {versions}", flush=True)
    only = [s for s in args.only.split(",") if s]
    want = [s for s in args.stacks.split(",") if s]
    for name, sc in scenarios(args.smoke).items():
        if only and name not in only:
            continue
        runs: dict[str, dict] = {}
        for stack in sc["stacks"]:
            if want and stack not in want:
                continue
            if stack == "b" and versions["liger_kernel"] is None:
                runs["b"] = {"stack": "b", "skipped": "liger_kernel is not importable"}
                continue
            budget = None
            if stack == "c" and sc["lora"] and not args.no_budget and runs.get("a", {}).get("peak_gib"):
                budget = runs["a"]["peak_gib"] * 2**30
            print(f"[{name}] stack {stack} ...", flush=True)
            runs[stack] = run_worker(name, stack, args, budget)
        summary = summarize(name, runs, ceiling)
        report["scenarios"][name] = summary
        print(f"== {name}", flush=True)
        for r in runs.values():
            print(_fmt(r) if "skipped" not in r else f"  b: skipped ({r['skipped']})", flush=True)
        for key in ("speed_c_over_a", "speed_c_over_b", "memory_c_over_a"):
            if key in summary:
                print(f"  {key}: {summary[key]:.3f}", flush=True)
        if "losses_agree_1pct" in summary:
            print(f"  first three losses a vs c agree within 1%: {summary['losses_agree_1pct']} "
                  f"(rel diffs {[f'{x:.2e}' for x in summary['first_losses_rel_diff']]})", flush=True)
        print(f"  target ({summary['target']}): {'MET' if summary['target_met'] else 'not met'}", flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "train_throughput.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {Path(out_dir) / 'train_throughput.json'}")


if __name__ == "__main__":
    main()
