"""Multi-GPU scaling: 8B-shape LoRA tokens/s per GPU at 1 and 2 processes, and a full fine-tune of the
8B shape sharded over 2 GPUs (FSDP2). Random weights (meta device, then materialised): nothing is
downloaded.

    python benchmarks/distributed.py --suite                  # all of it; needs 2 GPUs (writes $OUT)
    torchrun --nproc-per-node 2 benchmarks/distributed.py --scenario lora8b [--fsdp]
    torchrun --nproc-per-node 2 benchmarks/distributed.py --scenario full8b --fsdp
    python benchmarks/distributed.py --scenario lora8b        # the 1-GPU baseline
    python benchmarks/distributed.py --suite --smoke          # CPU: tiny shapes, gloo, 2 processes

Each run uses Tunery's own pieces the way `tunery train` does: the own decoder with fused kernels,
LoRA r=16 on all seven linears (fp32 adapters, bf16 base), `tunery.train.parallel.parallelize` (DDP
without --fsdp, FSDP2 per block + root with bf16 params / fp32 reduction with it), AdamW from
`tunery.train.optim`, the global-token loss normaliser and `clip_grad_norm` of the loop. Each rank
trains on its own micro-batches of `--batch` rows x `--seq` tokens.

Reported per run: tokens/s per GPU, step time, peak GiB per GPU (max over ranks). The suite adds
the LoRA scaling ratios (2-GPU tokens/s per GPU over the 1-GPU figure; target >= 0.9) and whether
the sharded 8B full fine-tune ran, with the AdamW memory it would need on one GPU. JSON goes to
$OUT/distributed.json (suite) or $OUT/distributed_<scenario>_<N>gpu[_fsdp].json (single run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from shapes import LINEARS, LLAMA_8B, TINY  # noqa: E402


def shape(smoke: bool) -> dict:
    return TINY if smoke else LLAMA_8B


def param_count(m: dict) -> int:
    h, i, L = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]
    qd, kvd = m["num_attention_heads"] * m["head_dim"], m["num_key_value_heads"] * m["head_dim"]
    per_layer = h * qd + 2 * h * kvd + qd * h + 3 * h * i + 2 * h
    emb = m["vocab_size"] * h * (1 if m["tie_word_embeddings"] else 2)
    return L * per_layer + emb + h


# ------------------------------------------------------------------------------------------ worker
def build(args, device, world: int):
    """The model, parallelised as the trainer does it, and the module to run."""
    import torch

    from tunery.adapters.lora import inject_lora
    from tunery.models.decoder import CausalLM
    from tunery.models.fused import set_fused, set_mlp_recompute
    from tunery.models.registry import decoder_config
    from tunery.train.parallel import parallelize

    m = shape(args.smoke)
    lora = args.scenario == "lora8b"
    cuda = device.type == "cuda"
    cfg = SimpleNamespace(fsdp=["full_shard", "auto_wrap"] if args.fsdp else None, fsdp_config=None,
                          dp_replicate_size=None, gradient_checkpointing=args.checkpointing, bf16="auto",
                          fp16=False, tf32=False, adapter="lora" if lora else None)
    dcfg = decoder_config(m)
    # LoRA: bf16 frozen base (as the trainer loads it); full fine-tune: fp32 master weights
    base_dtype = torch.bfloat16 if (lora and cuda) else torch.float32
    torch.set_default_dtype(base_dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(dcfg)
    finally:
        torch.set_default_dtype(torch.float32)
    sharded_init = args.fsdp and not lora and world > 1
    torch.manual_seed(0)
    if not sharded_init:  # materialise the whole model on this GPU
        model.to_empty(device=device)
        _init(model)
    if lora:
        inject_lora(model, LINEARS, r=16, alpha=32)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters train in fp32; autocast runs the matmuls in bf16
    set_fused(model, cuda)
    if args.mlp_recompute:
        set_mlp_recompute(model, True)
    if args.checkpointing:
        from tunery.train.activations import apply_checkpointing

        apply_checkpointing(model, True)
    run = parallelize(model, cfg, device) if world > 1 else model
    if sharded_init:  # full fine-tune: shard on meta, then materialise only this rank's shards
        model.to_empty(device=device)
        _init(model)
    return model, run, cfg


def _init(model) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "lora_B" in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)


def worker(args) -> dict:
    import torch
    import torch.distributed as dist

    from tunery.kernels.cross_entropy import linear_cross_entropy
    from tunery.train import distributed as dist_util
    from tunery.train.optim import build_optimizer

    rank, local, world = dist_util.init(600)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    m = shape(args.smoke)
    res: dict = dict(scenario=args.scenario, world=world, fsdp=bool(args.fsdp), batch=args.batch, seq=args.seq,
                     device=torch.cuda.get_device_name(device) if cuda else "cpu", params=param_count(m))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    model, run, cfg = build(args, device, world)
    res["build_s"] = round(time.perf_counter() - t, 1)
    opt_cfg = SimpleNamespace(weight_decay=0.0, optimizer="adamw", learning_rate=1e-5, adam_beta1=0.9,
                              adam_beta2=0.999, adam_epsilon=1e-8)
    opt = build_optimizer(model, opt_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = int(sum(p.numel() for p in params))
    b, s = args.batch, args.seq
    gen = torch.Generator().manual_seed(1234 + rank)
    pos = torch.arange(s, device=device).expand(b, s)
    cu = torch.arange(0, b * s + 1, s, device=device, dtype=torch.int32)
    normalizer = world * b * (s - 1)  # the global trained-token count, as in the loop
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step() -> float:
        ids = torch.randint(0, m["vocab_size"], (b, s), generator=gen).to(device, non_blocking=True)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        with amp:
            hidden = run(ids, pos, cu, s)
            loss = linear_cross_entropy(hidden.reshape(b * s, -1), run.head_weight, labels.reshape(-1)) / normalizer
        loss.backward()
        dist_util.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [step() for _ in range(args.warmup)]
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    dist_util.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    stats = torch.tensor([dt, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0], dtype=torch.float64,
                         device=device)
    if dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    dt, peak = float(stats[0]), float(stats[1])
    res.update(step_s=dt / args.steps, tokens_per_s_per_gpu=args.steps * b * s / dt,
               tokens_per_s_total=world * args.steps * b * s / dt, peak_gib_per_gpu=peak if cuda else None,
               losses=[round(x, 5) for x in losses[:3]] + [round(losses[-1], 5)])
    dist_util.shutdown()
    return res


# ------------------------------------------------------------------------------------------ suite
def launch(args, scenario: str, nproc: int, fsdp: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        script = [str(Path(__file__).resolve()), "--scenario", scenario, "--result", str(out),
                  "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                  "--seq", str(args.seq)]
        script += ["--fsdp"] * fsdp + ["--smoke"] * args.smoke + ["--cpu"] * args.cpu
        script += ["--checkpointing"] * args.checkpointing + ["--mlp-recompute"] * args.mlp_recompute
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script]
        else:
            cmd = [sys.executable, *script]
        env = dict(os.environ)
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        t = time.perf_counter()
        print(f"[{scenario} x{nproc}{' fsdp' if fsdp else ''}] ...", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        res = json.loads(out.read_text()) if out.exists() else {}
        if "tokens_per_s_per_gpu" not in res:
            res.update(scenario=scenario, world=nproc, fsdp=fsdp, error=f"exit {proc.returncode}",
                       stderr_tail=proc.stderr[-4000:])
        res["wall_s"] = round(time.perf_counter() - t, 1)
        print("  " + (f"{res['tokens_per_s_per_gpu']:.0f} tok/s/GPU  step {res['step_s'] * 1e3:.0f} ms  peak "
                      f"{res['peak_gib_per_gpu']} GiB" if "error" not in res else
                      f"ERROR {res['error']}\n{res['stderr_tail'][-2500:]}"), flush=True)
        return res


def suite(args) -> dict:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() and not args.cpu else 0
    report: dict = {"device": torch.cuda.get_device_name() if gpus else "cpu", "gpus": gpus, "torch": torch.__version__,
                    "smoke": args.smoke, "batch": args.batch, "seq": args.seq, "steps": args.steps, "runs": {}}
    runs = report["runs"]
    runs["lora8b_1gpu"] = launch(args, "lora8b", 1, False)
    if gpus >= 2 or not gpus:
        runs["lora8b_2gpu_ddp"] = launch(args, "lora8b", 2, False)
        runs["lora8b_2gpu_fsdp"] = launch(args, "lora8b", 2, True)
        runs["full8b_2gpu_fsdp"] = launch(args, "full8b", 2, True)
    else:
        report["note"] = "only one GPU: the 2-process runs were skipped"
    if args.with_single_full:
        runs["full8b_1gpu"] = launch(args, "full8b", 1, False)
    base = runs["lora8b_1gpu"].get("tokens_per_s_per_gpu")
    for key in ("lora8b_2gpu_ddp", "lora8b_2gpu_fsdp"):
        r = runs.get(key, {})
        if base and r.get("tokens_per_s_per_gpu"):
            report[f"scaling_{key}"] = r["tokens_per_s_per_gpu"] / base
    best = max([v for k, v in report.items() if k.startswith("scaling_")], default=None)
    report["lora_scaling_target"] = "2-GPU tokens/s per GPU >= 0.9 x the 1-GPU figure"
    report["lora_scaling_met"] = best is not None and best >= 0.9
    n = param_count(shape(args.smoke))
    report["full8b_adamw_state_gib_one_gpu"] = round(16 * n / 2**30, 1)  # fp32 weights + grads + 2 moments
    full = runs.get("full8b_2gpu_fsdp", {})
    report["full8b_sharded_ran"] = "tokens_per_s_per_gpu" in full
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="store_true", help="run every configuration (1 and 2 GPUs) and compare")
    ap.add_argument("--scenario", choices=["lora8b", "full8b"], default="lora8b")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per block) instead of DDP")
    ap.add_argument("--batch", type=int, default=2, help="rows per micro-batch per GPU")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="per-block activation checkpointing")
    ap.add_argument("--mlp-recompute", action="store_true", help="recompute the MLP activations in backward")
    ap.add_argument("--with-single-full", action="store_true",
                    help="suite: also try the 8B full fine-tune on one GPU (expected not to fit)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; with --cpu a CPU/gloo run")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--timeout", type=int, default=1500)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke and args.seq == 2048:
        args.seq = 64
    out_dir = os.environ.get("OUT")
    if args.suite:
        report = suite(args)
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "distributed.json").write_text(json.dumps(report, indent=2))
            print(f"wrote {Path(out_dir) / 'distributed.json'}")
        return
    try:
        res = worker(args)
    except Exception as e:
        res = {"scenario": args.scenario, "error": repr(e), "stderr_tail": traceback.format_exc()}
        print(res["stderr_tail"], file=sys.stderr, flush=True)
        if args.result and int(os.environ.get("RANK", 0)) == 0:
            Path(args.result).write_text(json.dumps(res))
        os._exit(1)  # non-zero: torchrun stops the other ranks instead of leaving them in a collective
    if int(os.environ.get("RANK", 0)) != 0:
        return
    if args.result:
        Path(args.result).write_text(json.dumps(res))
    print(json.dumps(res, indent=2))
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        name = f"distributed_{res['scenario']}_{res['world']}gpu{'_fsdp' if res['fsdp'] else ''}.json"
        (Path(out_dir) / name).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
