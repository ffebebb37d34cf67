"""Memory benchmark (issue 5): QLoRA / LoRA peak memory, speed and longest trainable context.

    python benchmarks/memory.py                          # H200: part "speed" (QLoRA 8B, seq 2048 x 2):
                                                         # tunery_act, standard (and liger) 3 times in turn,
                                                         # 7 warm-up + 10 timed steps each, medians compared
    python benchmarks/memory.py --part context --stacks tunery --modes qlora      # one search per command
    python benchmarks/memory.py --part context --stacks tunery --modes lora16
    python benchmarks/memory.py --part context --stacks standard,liger --modes qlora,lora16
    python benchmarks/memory.py --smoke                  # CPU: tiny shapes, both parts, a few seconds each
    python benchmarks/memory.py --stacks tunery_act,standard --phases   # + forward / backward / optimizer times
    python benchmarks/memory.py --stacks tunery_act --rounds 1 --set save_off=0   # a variant: gate/up always recomputed
    python benchmarks/memory.py --stacks tunery_act,standard --set gap=true   # offload_weights_mode gap, the planner's pick
    python benchmarks/memory.py --stacks tunery_act --trace   # + a profiler trace and where the GPU idles
    python benchmarks/memory.py --stacks tunery_act,standard --set graph=false   # tunery's step eager, not replayed

Model: random weights of the Llama-3.1-8B shape (built on the meta device and materialised tensor by
tensor on the GPU: nothing is downloaded, the 16-bit model never exists whole for QLoRA), LoRA r=16
alpha=32 on all seven linears, bf16 compute, fp32 adapter weights, AdamW(fused).

Stacks, each configuration in its own subprocess:

- tunery: own decoder + fused kernels; NF4 base with double quantization (quant/), the frozen input
  embedding in CPU memory, gradient checkpointing "offload" (block inputs in pinned CPU memory),
  MLP chunked over the sequence for long rows (variants: tunery_rc, the fused MLP also recomputes
  gate/up in backward; tunery_act, every other saved activation offloaded, no block recompute, gate/up
  recomputed except in the blocks save_mlp "auto" picks and the last kept one, as the trainer's defaults;
  the kept blocks and how many of them keep gate/up: the planner's picks under 7 GiB; the whole step
  captured as a CUDA graph once save_mlp "auto" has decided, as the trainer's `cuda_graph: true`; the
  CPU-held embedding looked up outside it); loss =
  linear_cross_entropy(hidden_flat[:-1], model.head_weight, ids_flat[1:]) / n.
- standard: transformers + peft + bitsandbytes QLoRA (Linear4bit nf4, double quant, bf16 compute),
  SDPA attention, non-reentrant gradient checkpointing, bf16 autocast, model(..., labels=ids).loss.
  Skipped cleanly when bitsandbytes is not importable (16-bit LoRA runs without it).
- liger: standard + apply_liger_kernel_to_llama() (fused RMSNorm/RoPE/SwiGLU/linear CE), if importable.
- standard_prep (only when asked for): standard built as peft's QLoRA guide does, through
  prepare_model_for_kbit_training (the embedding, norms and LM head in fp32). Reported beside standard,
  which stays the reference of the 2.0x target.

Part "speed": seq 2048, micro-batch 2; tokens/s over the timed steps and peak memory
(torch.cuda.max_memory_allocated over all training steps); targets: tunery peak <= 7 GiB and
tokens/s >= 2.0x standard. Part "context": micro-batch 1 under an 80 GiB cap
(torch.cuda.set_per_process_memory_fraction); one training step per length; tunery starts at the
target (QLoRA 409600, LoRA 307200 tokens) and the planner's prediction, the other stacks grow 2x from
16k then bisect; targets: tunery >= 400k (QLoRA) and >= 300k (16-bit LoRA). Every tunery
measurement prints the planner's prediction (tunery.train.plan) beside it. Results: $OUT/memory.json.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from shapes import LINEARS, LLAMA_8B, GiB  # noqa: E402

TINY = dict(LLAMA_8B, vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)
TARGETS = {"peak_gib": 7.0, "speed_ratio": 2.0, "context": {"qlora": 400_000, "lora16": 300_000}}
CONTEXT_START = {"qlora": 409_600, "lora16": 307_200}


# ------------------------------------------------------------------------------------------ helpers
def planner_setup(spec: dict):
    from tunery.train.plan import Setup

    return Setup(seq_len=spec["seq"], micro_batch=spec["batch"], adapter="qlora" if spec["mode"] == "qlora" else "lora",
                 lora_r=16, double_quant=True, checkpointing=spec.get("ckpt", "offload"),
                 mlp_chunk=spec.get("mlp_chunk"), keep_on_gpu=spec.get("keep_on_gpu", 0),
                 embed_on_cpu=spec.get("embed_on_cpu", True), mlp_recompute=spec.get("mlp_recompute", False),
                 ignored_labels=False, offload_strategy=spec.get("offload", "inputs"),
                 mlp_save_kept=spec.get("save_kept", 0), mlp_save_offloaded=spec.get("save_off", 0),
                 stream_weights=spec.get("stream_weights", 0), weights_mode=spec.get("weights_mode", "stream"))


def predict(spec: dict) -> float:
    from tunery.train.plan import ModelShape, peak_bytes

    return peak_bytes(ModelShape.from_hf(spec["model"]), planner_setup(spec)) / GiB


def host_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 64 * GiB


def tunery_long_settings(spec: dict, cap_bytes: float) -> dict:
    """Offload settings for a long row: MLP chunks, and as many block inputs kept on the GPU as the
    planner says fit under the cap (fewer host copies); the rest must fit in ~85% of free host RAM."""
    from dataclasses import replace

    from tunery.train.plan import ModelShape, best_keep_on_gpu

    shape = ModelShape.from_hf(spec["model"])
    tokens = spec["seq"] * spec["batch"]
    chunk = 8192 if tokens > 16384 else None
    s = replace(planner_setup(dict(spec, mlp_chunk=chunk)), checkpointing="offload")
    keep = best_keep_on_gpu(shape, s, int(cap_bytes * 0.92))
    u = tokens * shape.hidden * 2
    host_layers = int(0.85 * host_available() // max(u, 1))
    keep = max(keep, shape.layers - host_layers)
    return {"mlp_chunk": chunk, "keep_on_gpu": min(keep, shape.layers)}


# ------------------------------------------------------------------------------------------ stacks
def _keep_within(spec: dict, budget: float) -> int:
    """Blocks whose activations the planner says can stay on the GPU under `budget` bytes."""
    from tunery.train.plan import ModelShape, best_keep_on_gpu

    return best_keep_on_gpu(ModelShape.from_hf(spec["model"]), planner_setup(spec), int(budget))


def _saves_within(spec: dict, budget: float) -> int:
    """Kept blocks that can also keep gate/up under `budget` bytes, by the planner."""
    from tunery.train.plan import ModelShape, best_save_kept

    return best_save_kept(ModelShape.from_hf(spec["model"]), planner_setup(spec), int(budget))


def _gap_within(spec: dict, budget: float) -> tuple[int, int, int] | None:
    """(offload_weights, keep_on_gpu, save_kept) with offload_weights_mode gap, by the planner."""
    from tunery.train.plan import ModelShape, best_weight_gap

    return best_weight_gap(ModelShape.from_hf(spec["model"]), planner_setup(spec), int(budget))


def build_tunery(spec: dict, device: str):
    import torch

    from tunery.adapters.lora import inject_lora
    from tunery.models.decoder import CausalLM
    from tunery.models.loading import _reset_buffers
    from tunery.models.registry import decoder_config
    from tunery.quant import init_quantized_random, offload_embedding
    from tunery.train.activations import apply_checkpointing

    cfg = decoder_config(spec["model"])
    with torch.device("meta"):
        model = CausalLM(cfg)
    init_quantized_random(model, device, torch.bfloat16, double_quant=True, quantize=spec["mode"] == "qlora")
    _reset_buffers(model)  # rope frequencies (fp32, computed, not stored)
    model.model.inv_freq = model.model.inv_freq.to(device)
    inject_lora(model, LINEARS, r=16, alpha=32)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapter weights, as the trainer does
    if spec.get("embed_on_cpu", True):
        offload_embedding(model)
    try:
        from tunery.models.fused import set_fused, set_mlp_recompute

        set_fused(model, device == "cuda")
        if "kcat" in spec:
            from tunery.kernels.lora import set_lora_kcat

            set_lora_kcat(bool(spec["kcat"]))
        set_mlp_recompute(model, bool(spec.get("mlp_recompute", False)))
    except ImportError:
        pass
    if "prefetch_ahead" in spec:  # --set prefetch_ahead=N: offloaded blocks coming back at once in backward
        import tunery.train.activations as act

        act.PREFETCH_AHEAD = int(spec["prefetch_ahead"])
    save_off = spec.get("save_off", 0)
    apply_checkpointing(model, spec.get("ckpt", "offload"), mlp_chunk=spec.get("mlp_chunk"),
                        keep_on_gpu=spec.get("keep_on_gpu", 0), offload=spec.get("offload", "inputs"),
                        save_mlp="auto" if save_off == "auto" else int(save_off),
                        save_mlp_kept=spec.get("save_kept", 0), stream_weights=spec.get("stream_weights", 0),
                        weights_mode=spec.get("weights_mode", "stream"))
    model.train()
    from tunery.kernels import host_copy, with_host_copy
    from tunery.kernels.cross_entropy import linear_cross_entropy

    state: dict = {}

    docs = max(1, int(spec.get("docs", 1)))

    def step(ids, embeds=None):
        b, t = ids.shape
        if state.get("shape") != (b, t):
            doc = -(-t // docs)  # each row holds `docs` documents (position ids restart, attention stays inside)
            state["shape"] = (b, t)
            state["pos"] = (torch.arange(t, device=ids.device) % doc).expand(b, t)
            starts = [r * t + s for r in range(b) for s in range(0, t, doc)] + [b * t]
            state["cu"] = torch.tensor(starts, device=ids.device, dtype=torch.int32)
            state["max"] = doc
        hidden = model(ids, state["pos"], state["cu"], state["max"], embeds=embeds)
        flat = hidden.reshape(b * t, -1)
        labels = ids.reshape(-1)[1:]
        host = host_copy(ids) if spec.get("label_host", True) else None
        if host is not None:  # what the trainer does: the loss counts ignored labels on the host (no sync)
            with_host_copy(labels, host.reshape(-1)[1:])
        return linear_cross_entropy(flat[:-1], model.head_weight, labels) / labels.numel()

    return model, step, None


def graph_train_step(model, step, opt):
    """--set graph=true: the tunery step captured whole as a CUDA graph (train/cuda_graph.py) after two
    eager steps; the CPU-held embedding is looked up outside it and handed in."""
    from tunery.train.cuda_graph import StepGraph

    sg = StepGraph(step, opt, checkpoint=getattr(model.model, "checkpoint_fn", None), warmup=2)

    def train_step(ids):
        losses, _ = sg.step(None, [dict(ids=ids, embeds=model.embed(ids))])
        return losses[0]

    train_step.graph = sg
    return train_step


def _materialize_hf(model, device: str, seed: int = 0) -> None:
    """Random bf16 weights for every parameter still on the meta device (std 0.02, norms 1)."""
    import torch
    import torch.nn as nn

    gen = torch.Generator(device=device).manual_seed(seed)
    for mname, mod in list(model.named_modules()):
        for pname, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if pname == "weight" and "norm" in mname.lower():
                t = torch.ones(p.shape, device=device, dtype=torch.bfloat16)
            else:
                t = torch.randn(p.shape, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
            mod._parameters[pname] = nn.Parameter(t, requires_grad=p.requires_grad)


def build_standard(spec: dict, device: str, liger: bool):
    import torch
    import torch.nn as nn
    from transformers import LlamaConfig, LlamaForCausalLM

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    qlora = spec["mode"] == "qlora"
    if qlora:
        import bitsandbytes as bnb
    kw = {k: v for k, v in spec["model"].items() if k != "model_type"}
    cfg = LlamaConfig(**kw)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    gen = torch.Generator(device=device).manual_seed(1)
    if qlora:  # what from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant)) builds
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and ".layers." in name:
                w = torch.randn(mod.out_features, mod.in_features, device=device, dtype=torch.bfloat16,
                                generator=gen) * 0.02
                lin = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.bfloat16,
                                        compress_statistics=True, quant_type="nf4", device="meta")
                try:
                    p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                          blocksize=64, module=lin)
                except TypeError:
                    p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                          blocksize=64)
                lin.weight = p.to(device)  # quantizes on the GPU
                del w
                parent, leaf = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), leaf, lin)
        model.is_loaded_in_4bit = True  # how peft recognises a bitsandbytes 4-bit model
    _materialize_hf(model, device)
    for name, mod in list(model.named_modules()):  # rotary buffers were on meta: rebuild them on the device
        if type(mod).__name__.endswith("RotaryEmbedding"):
            try:
                fresh = type(mod)(config=cfg, device=device)
            except TypeError:
                fresh = type(mod)(config=cfg).to(device)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, fresh)
    from peft import LoraConfig, get_peft_model

    if spec["stack"] == "standard_prep":  # peft's documented QLoRA recipe: every non-4-bit weight (embedding,
        # norms, LM head) cast to fp32 before the adapters go on; the checkpointing is set below as for
        # "standard", so the fp32 casts are the one difference
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEARS,
                                             bias="none", task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()

    def step(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, step, torch.bfloat16


# ------------------------------------------------------------------------------------------ worker
def worker(spec: dict) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() and not spec.get("cpu") else "cpu"
    cuda = device == "cuda"
    res: dict = {k: v for k, v in spec.items() if k != "model"}
    res["device"] = device
    if cuda and spec.get("cap_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * GiB / total))
    t0 = time.perf_counter()
    if spec["stack"].startswith("tunery"):
        model, step, autocast = build_tunery(spec, device)
        res["predicted_gib"] = round(predict(spec), 3)
    else:
        model, step, autocast = build_standard(spec, device, liger=spec["stack"] == "liger")
    res["build_s"] = round(time.perf_counter() - t0, 1)
    lora_bases = [type(getattr(m, "base_layer", m.weight)).__name__ for m in model.modules() if hasattr(m, "lora_A")]
    res["lora_base_types"] = sorted(set(lora_bases))  # e.g. Linear4bit (bitsandbytes) or NF4Weight
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=cuda, foreach=None if cuda else False)
    gen = torch.Generator().manual_seed(1234)
    vocab = spec["model"]["vocab_size"]
    n_steps = spec["warmup"] + spec["steps"]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        res["static_gib"] = round(torch.cuda.memory_allocated() / GiB, 3)
    losses, t_start = [], None
    pauses: list[float] = []  # Python garbage-collector pauses in the timed steps (ms)
    gc_t0: list[float] = []

    def gc_watch(phase, info):
        if t_start is None:
            return
        if phase == "start":
            gc_t0[:] = [time.perf_counter()]
        elif gc_t0:
            pauses.append(1e3 * (time.perf_counter() - gc_t0[0]))

    gc.callbacks.append(gc_watch)
    graph_step = graph_train_step(model, step, opt) if spec.get("graph") and cuda else None
    for i in range(n_steps):
        if i == spec["warmup"]:
            if cuda:
                torch.cuda.synchronize()
            if spec["stack"].startswith("tunery"):  # what the trainer does
                from tunery.train.loop import freeze_long_lived

                freeze_long_lived()
            if spec.get("gc") == "frozen":  # diagnostics: no collection in the timed steps
                gc.collect()
                gc.freeze()
                gc.disable()
            t_start = time.perf_counter()
            res["timed_from"] = time.time()  # the parent's clock sampler keeps the samples in this window
        if graph_step is not None:
            loss = graph_step(_batch(spec, vocab, gen, device))
        else:
            loss = _train_step(step, opt, autocast, device, _batch(spec, vocab, gen, device))
        # "step": read the loss every step (a host sync each step, as before); "end": keep it on the device
        # and read all losses after the timed steps (how a training loop that logs every N steps runs)
        losses.append(float(loss.item()) if spec.get("loss_sync", "step") == "step" else loss.detach())
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t_start if t_start is not None else None
    res["timed_to"] = time.time()
    gc.callbacks.remove(gc_watch)
    gc.enable()
    res["gc_pause_ms"] = {"total": round(sum(pauses), 1), "max": round(max(pauses, default=0.0), 1), "n": len(pauses)}
    losses = [float(x) for x in losses]
    res["ok"] = True
    res["losses"] = [round(x, 4) for x in losses]
    if dt and spec["steps"]:
        res["step_s"] = dt / spec["steps"]
        res["tokens_per_s"] = spec["steps"] * spec["batch"] * spec["seq"] / dt
    if cuda:
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
        res["reserved_gib"] = round(torch.cuda.max_memory_reserved() / GiB, 3)
    if spec.get("phases") and cuda:
        res["phases_ms"] = _phase_times(spec, step, opt, autocast, device, vocab, gen)
    if spec.get("profile"):
        _profile_step(spec, step, opt, autocast, device, vocab, gen, graph_step=graph_step)
    if graph_step is not None:
        sg = graph_step.graph
        res["graph_stats"] = {"replays": sg.replays, "eager_steps": sg.eager_steps, "why_eager": sg.why_eager}
    fn = getattr(getattr(model, "model", None), "checkpoint_fn", None)
    if hasattr(fn, "host_bytes"):
        res["host_pinned_gib"] = round(fn.host_bytes / GiB, 2)
        if getattr(fn, "auto_report", None):
            res["save_mlp_auto"] = fn.auto_report
        if hasattr(getattr(fn, "weights", None), "lent_blocks"):  # offload_weights_mode lend
            res["lend_blocks"] = fn.weights.lent_blocks
    return res


def _batch(spec: dict, vocab: int, gen, device: str):
    """Random ids on `device`, sent as the trainer sends a batch; for tunery with their host copy
    attached, as the trainer does (the CPU-held embedding reads the ids and the loss counts ignored
    labels there: no sync per step)."""
    import torch

    host_ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=gen)
    # every stack gets its batch as a DataLoader with pin_memory hands it over, sent without a wait:
    # a blocking copy (or one from pageable memory) makes the CPU wait for the previous step's GPU
    # work, so no stack could queue a step's start while the last one still runs
    ids = host_ids.pin_memory().to(device, non_blocking=True) if device == "cuda" else host_ids.to(device)
    if spec["stack"].startswith("tunery") and ids is not host_ids:
        from tunery.kernels import with_host_copy

        with_host_copy(ids, host_ids)
    return ids


def _train_step(step, opt, autocast, device: str, ids):
    """Forward (under autocast when the stack uses it), backward, optimizer step; the loss."""
    import torch

    with torch.autocast(device, dtype=autocast) if autocast is not None else _null():
        loss = step(ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _profile_step(spec: dict, step, opt, autocast, device: str, vocab: int, gen, n: int = 2,
                  graph_step=None) -> None:
    """n more training steps under torch.profiler, back to back as in the timed loop (the CPU may
    queue a step ahead of the GPU): where the GPU time goes, kernel by kernel. With `graph_step` the
    profiled steps are replays of the captured step, as timed (not eager steps)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            if graph_step is not None:
                graph_step(_batch(spec, vocab, gen, device))
            else:
                _train_step(step, opt, autocast, device, _batch(spec, vocab, gen, device))
        if device == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
    if spec.get("trace"):  # where the compute stream idles, and why (benchmarks/trace_gaps.py)
        import gzip

        from trace_gaps import load, summarize

        raw = Path(spec["profile"]).with_suffix(".json")
        prof.export_chrome_trace(str(raw))
        table = summarize(load(raw)) + "\n\n" + table
        with open(raw, "rb") as f, gzip.open(str(raw) + ".gz", "wb") as g:
            g.write(f.read())
        raw.unlink()
    Path(spec["profile"]).write_text(table)


def _phase_times(spec: dict, step, opt, autocast, device: str, vocab: int, gen, n: int = 3) -> dict:
    """Median ms of forward (+loss), backward and optimizer step, each closed by a synchronize: which
    phase a slow step loses its time in (a forward that waits for its offload copies shows here)."""
    import statistics

    import torch

    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(n):
        ids = _batch(spec, vocab, gen, device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=autocast) if autocast is not None else _null():
            loss = step(ids)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[k].append(round(1e3 * dt, 1))
    return {k: statistics.median(v) for k, v in times.items()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ClockSampler:
    """nvidia-smi sampling the SM clock, power draw and throttle reasons every 200 ms beside a worker.

    Why: a step that keeps the GPU busy all the time can be power-bound. On an H200 Tunery's QLoRA
    step runs at ~1.5-1.7 GHz at the 700 W cap while a stack that leaves the GPU idle part of each
    step runs near 1.9 GHz (benchmarks/RESULTS.md, fifth session): the same kernels take longer.
    Does nothing when nvidia-smi is not on PATH."""

    FIELDS = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"

    def __init__(self, path: Path):
        import shutil

        self.path, self.proc = path, None
        if shutil.which("nvidia-smi"):
            self.file = open(path, "w")
            self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits",
                                          "-lms", "200", "-i", "0"], stdout=self.file, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.file.close()

    def summary(self, t0: float, t1: float) -> dict | None:
        """Median SM clock and power, and the share of samples under the software power cap, over the
        timed steps [t0, t1] (wall-clock seconds)."""
        import statistics
        from datetime import datetime

        if self.proc is None:
            return None
        rows = []
        for line in self.path.read_text().splitlines():
            parts = [x.strip() for x in line.split(",")]
            try:
                when = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                if t0 <= when <= t1:
                    rows.append((float(parts[1]), float(parts[2]), int(parts[3], 16)))
            except (ValueError, IndexError):
                continue  # a header, a cut line or "[N/A]"
        if not rows:
            return None
        return {"samples": len(rows), "sm_mhz_median": statistics.median(r[0] for r in rows),
                "power_w_median": round(statistics.median(r[1] for r in rows), 1),
                "power_capped_share": round(sum(1 for r in rows if r[2] & 0x4) / len(rows), 2)}


def run_worker(spec: dict, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        env = dict(os.environ)
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--result", str(out)]
        t = time.perf_counter()
        clocks = ClockSampler(Path(tmp) / "clocks.csv") if not spec.get("cpu") else None
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            tail, code = proc.stderr[-3000:], proc.returncode
        except subprocess.TimeoutExpired as e:
            tail, code = (e.stderr or b"")[-3000:] if isinstance(e.stderr, bytes) else str(e.stderr)[-3000:], "timeout"
        finally:
            if clocks is not None:
                clocks.stop()
        if out.exists():
            res = json.loads(out.read_text())
            if clocks is not None and res.get("timed_from"):
                res["gpu_clocks"] = clocks.summary(res["timed_from"], res["timed_to"])
        else:
            res = {k: v for k, v in spec.items() if k != "model"}
            res.update(ok=False, error=f"exit {code}" + (" (killed: host memory?)" if code == -9 else ""),
                       stderr_tail=tail if isinstance(tail, str) else tail.decode(errors="replace"))
        res["wall_s"] = round(time.perf_counter() - t, 1)
        return res


# ------------------------------------------------------------------------------------------ parts
def available(stack: str, mode: str) -> str | None:
    """None when the stack can run, else why not."""
    if stack.startswith("tunery"):
        return None
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return "peft is not importable"
    if stack == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not importable"
    if mode == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # a wheel without a GPU build raises at import
            return f"bitsandbytes is not importable ({type(e).__name__})"
    return None


def fmt(r: dict) -> str:
    docs = f" ({r['docs']} docs)" if r.get("docs", 1) > 1 else ""
    name = f"{r.get('stack')}/{r.get('mode')} seq {r.get('seq')} x {r.get('batch')}{docs}"
    if not r.get("ok"):
        err = r.get("error", "")
        if "oom" in str(err).lower() or "out of memory" in str(r.get("stderr_tail", "")).lower():
            err = "out of memory"
        return f"  {name:<40} FAILED: {err}"
    peak = f"{r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "n/a"
    pred = f"{r['predicted_gib']:.2f} GiB" if r.get("predicted_gib") is not None else "-"
    speed = f"{r['tokens_per_s']:9.0f} tok/s" if r.get("tokens_per_s") else ""
    extra = f" host {r['host_pinned_gib']} GiB" if r.get("host_pinned_gib") else ""
    if r.get("lend_blocks") is not None:
        extra += f" lend: gate/up of {r['lend_blocks']} blocks in weight memory"
    if r.get("graph_stats"):
        g = r["graph_stats"]
        extra += f" graph: {g['replays']} replays" + (f" (eager: {g['why_eager']})" if g["why_eager"] else "")
    if r.get("save_mlp_auto"):
        a = r["save_mlp_auto"]
        extra += (f" gate/up kept by {a['save_mlp_blocks']} blocks (forward {a['forward_ms']} ms, "
                  f"{a['copied_gb']} GB out at {a['copy_gbps']} GB/s)")
    if r.get("phases_ms"):
        extra += " phases ms " + " ".join(f"{k} {v}" for k, v in r["phases_ms"].items())
    if r.get("gpu_clocks"):
        c = r["gpu_clocks"]
        extra += f" sm {c['sm_mhz_median']:.0f} MHz {c['power_w_median']:.0f} W (capped {c['power_capped_share']:.0%})"
    if (r.get("gc_pause_ms") or {}).get("n"):
        extra += f" gc {r['gc_pause_ms']['total']} ms in {r['gc_pause_ms']['n']} (max {r['gc_pause_ms']['max']})"
    return f"  {name:<40} peak {peak:>10}  planner {pred:>10}  {speed}{extra}  (build {r.get('build_s')} s)"


def speed_spec(stack: str, mode: str, model: dict, seq: int, batch: int, smoke: bool = False, warmup: int = 7,
               steps: int = 10, cpu: bool = False, phases: bool = False, loss_sync: str = "end",
               overrides: dict | None = None) -> dict:
    """A speed-part worker's settings for one stack (also benchmarks/step_lead.py's); `overrides` (--set)
    apply to tunery stacks before the planner picks the offload settings they leave open."""
    base = "tunery_act" if stack == "tunery_nokcat" else stack  # LoRA B outside the base GEMM
    spec = dict(stack=stack, mode=mode, seq=seq, batch=batch, model=model, warmup=warmup, steps=steps,
                ckpt="offload", cpu=cpu, offload="activations" if base == "tunery_act" else "inputs",
                mlp_recompute=base in ("tunery_rc", "tunery_act"), phases=phases, loss_sync=loss_sync)
    if base == "tunery_act":  # as the trainer's defaults offload_save_mlp and offload_save_mlp_kept
        spec["save_off"], spec["save_kept"] = "auto", 1
        spec["graph"] = True  # the trainer's cuda_graph: true (--set graph=false: eager)
    if stack == "tunery_nokcat":
        spec["kcat"] = False
    fixed = dict(overrides or {}) if stack.startswith("tunery") else {}
    if fixed.pop("lend", False):  # --set lend=true: offload_weights_mode lend, over every block unless
        # --set stream_weights=N says how many (weight_stream.py)
        fixed.setdefault("stream_weights", (TINY if smoke else LLAMA_8B)["num_hidden_layers"])
        fixed["weights_mode"] = "lend"
    spec.update(fixed)
    if base == "tunery_act" and not smoke:  # the planner's picks under 7 GiB (it errs high)
        budget = TARGETS["peak_gib"] * GiB
        # --set gap=true: the first blocks' 4-bit weights off the GPU around the peak, for less recompute
        # (offload_weights_mode gap, plan.best_weight_gap). Not the default: faster in paired runs, slower
        # where save_mlp "auto" then picked many blocks (benchmarks/RESULTS.md, eleventh session)
        gap = _gap_within(spec, budget) if spec.get("gap") and "stream_weights" not in fixed else None
        if gap and not {"keep_on_gpu", "save_kept"} & fixed.keys():
            n, keep, saves = gap
            spec.update(stream_weights=n, weights_mode="gap", keep_on_gpu=keep, save_kept=saves)
        else:  # the kept blocks' activations stay on the GPU: as many as fit, then as many keeping gate/up
            if "keep_on_gpu" not in fixed:
                spec["keep_on_gpu"] = _keep_within(spec, budget)
            if "save_kept" not in fixed:
                spec["save_kept"] = _saves_within(spec, budget)
    return spec


def part_speed(args, stacks, modes) -> dict:
    """Each stack in its own subprocess; with --rounds N the stacks run N times in turn (the order
    rotated each round) and each stack's median run is reported: a shared host's CPU speed drifts
    between and within calls, and part of a QLoRA step waits on the CPU."""
    model = TINY if args.smoke else LLAMA_8B
    seq, batch = (64, 2) if args.smoke else (2048, 2)
    runs: dict = {}
    all_runs: dict[str, list[dict]] = {}
    for rnd in range(max(1, args.rounds)):
        order = stacks[rnd % len(stacks):] + stacks[:rnd % len(stacks)]
        for mode in modes:
            for stack in order:
                why = available(stack, mode)
                key = f"{stack}/{mode}"
                if why:
                    runs[key] = {"stack": stack, "mode": mode, "skipped": why}
                    if rnd == 0:
                        print(f"  {key:<40} skipped: {why}", flush=True)
                    continue
                spec = speed_spec(stack, mode, model, seq, batch, smoke=args.smoke, warmup=args.warmup,
                                  steps=args.steps, cpu=args.cpu, phases=args.phases, loss_sync=args.loss_sync,
                                  overrides=dict(args.set))
                if (args.profile or args.trace) and stack.startswith("tunery") and os.environ.get("OUT") and rnd == 0:
                    spec["profile"] = str(Path(os.environ["OUT"]) / f"profile_{stack}_{mode}{args.tag}.txt")
                    spec["trace"] = args.trace
                r = run_worker(spec, args.timeout)
                r["round"] = rnd
                all_runs.setdefault(key, []).append(r)
                print(fmt(r) + (f"  [round {rnd + 1}]" if args.rounds > 1 else ""), flush=True)
    for key, rs in all_runs.items():
        ok = sorted((r for r in rs if r.get("ok")), key=lambda r: r.get("tokens_per_s") or 0)
        runs[key] = ok[len(ok) // 2] if ok else rs[-1]  # the median run (upper median for an even count)
        if len(rs) > 1:
            runs[key]["tokens_per_s_rounds"] = [round(r.get("tokens_per_s") or 0) for r in rs]
    out: dict = {"runs": runs}
    variants = [r for k, r in runs.items() if k.startswith("tunery") and k.endswith("/qlora") and r.get("ok")]
    fits = [r for r in variants if r.get("peak_gib") is None or r["peak_gib"] <= TARGETS["peak_gib"]]
    t = max(fits or variants, key=lambda r: r.get("tokens_per_s") or 0, default={})  # fastest within the cap
    out["tunery_variant"] = t.get("stack")
    s = runs.get("standard/qlora", {})
    if t.get("peak_gib") is not None:
        out["tunery_peak_gib"] = t["peak_gib"]
        out["peak_target_met"] = t["peak_gib"] <= TARGETS["peak_gib"]
        if t.get("predicted_gib"):
            out["planner_error"] = t["predicted_gib"] / t["peak_gib"] - 1
    if t.get("tokens_per_s") and s.get("tokens_per_s"):
        out["speed_over_standard"] = t["tokens_per_s"] / s["tokens_per_s"]
        out["speed_target_met"] = out["speed_over_standard"] >= TARGETS["speed_ratio"]
        if s.get("peak_gib"):
            out["memory_over_standard"] = t["peak_gib"] / s["peak_gib"]
        energy = energy_over(t, s)
        if energy is not None:
            out["energy_per_token_over_standard"] = energy
            out["standard_power_capped_share"] = s["gpu_clocks"]["power_capped_share"]
    lg = runs.get("liger/qlora", {})
    if t.get("tokens_per_s") and lg.get("tokens_per_s"):
        out["speed_over_liger"] = t["tokens_per_s"] / lg["tokens_per_s"]
    sp = runs.get("standard_prep/qlora", {})  # a second reading of "the standard stack", beside the first
    if t.get("tokens_per_s") and sp.get("tokens_per_s"):
        out["speed_over_standard_prep"] = t["tokens_per_s"] / sp["tokens_per_s"]
        energy = energy_over(t, sp)
        if energy is not None:
            out["energy_per_token_over_standard_prep"] = energy
    return out


def energy_over(fast: dict, slow: dict) -> float | None:
    """slow's GPU energy per token over fast's (median board power / tokens per second), or None without
    clock samples. At the power cap a step's time is its energy over ~700 W, so where both stacks sit at
    the cap the speed ratio comes down to this one; where `slow` waits on its host, the speed ratio is
    higher. It tells the host-dependent part of a speed ratio from the GPU-work part."""
    fc, sc = fast.get("gpu_clocks") or {}, slow.get("gpu_clocks") or {}
    if not (fc.get("power_w_median") and sc.get("power_w_median") and fast.get("tokens_per_s")
            and slow.get("tokens_per_s")):
        return None
    return (sc["power_w_median"] / slow["tokens_per_s"]) / (fc["power_w_median"] / fast["tokens_per_s"])


def part_context(args, stacks, modes) -> dict:
    model = TINY if args.smoke else LLAMA_8B
    cap = args.cap_gib
    step = 256 if args.smoke else 4096
    result: dict = {"cap_gib": cap}
    deadline = time.time() + args.time_budget
    for mode in modes:
        for stack in stacks:
            key = f"{stack}/{mode}"
            why = available(stack, mode) or ("long rows offload block inputs (stack tunery)"
                                             if stack in ("tunery_act", "tunery_rc") else None)
            if why:
                result[key] = {"skipped": why}
                print(f"  {key:<40} skipped: {why}", flush=True)
                continue
            tried: list[dict] = []
            trial = functools.partial(_context_trial, args, stack, mode, model, tried)

            lo, hi = 0, None
            if args.lengths:
                for n in args.lengths:
                    if trial(n):
                        lo = max(lo, n)
            else:
                if stack == "tunery":
                    start = CONTEXT_START[mode] if not args.smoke else 2048
                    guess = _planner_max(model, mode, cap, step)
                    order = [start] + ([guess] if guess > start else [])
                else:
                    order = [1024 if args.smoke else 16384]
                n = order.pop(0)
                while time.time() < deadline and len(tried) < args.max_trials:
                    if trial(n):
                        lo = n
                        nxt = order.pop(0) if order else (2 * n if hi is None else (lo + hi) // 2)
                    else:
                        hi = n
                        order = []
                        nxt = (lo + hi) // 2 if lo else n // 2
                    nxt = max(step, nxt // step * step)
                    if hi is not None and (hi - lo) <= max(step, hi // 20):
                        break
                    if nxt in (lo, hi) or (args.smoke and nxt > 4096):
                        break
                    n = nxt
            result[key] = {"longest_ok": lo, "first_failure": hi, "trials": tried,
                           "target": TARGETS["context"].get(mode) if stack == "tunery" else None}
            if stack == "tunery":
                result[key]["target_met"] = lo >= TARGETS["context"][mode]
                result[key]["planner_max"] = _planner_max(model, mode, cap, step)
            print(f"  {key}: longest trained context {lo} tokens (first failure {hi})", flush=True)
    return result


def _context_trial(args, stack: str, mode: str, model: dict, tried: list, seq: int) -> bool:
    spec = dict(stack=stack, mode=mode, seq=seq, batch=1, model=model, warmup=1, steps=0, cpu=args.cpu,
                cap_gib=args.cap_gib, ckpt="offload" if stack == "tunery" else True,
                docs=args.docs if stack == "tunery" else 1)
    if stack == "tunery":
        spec.update(tunery_long_settings(spec, args.cap_gib * GiB))
    r = run_worker(spec, args.timeout)
    tried.append(r)
    print(fmt(r), flush=True)
    return bool(r.get("ok"))


def _planner_max(model: dict, mode: str, cap_gib: float, step: int) -> int:
    from tunery.train.plan import CONTEXT_RESERVE, ModelShape, max_seq_len

    spec = dict(model=model, mode=mode, seq=1, batch=1, mlp_chunk=8192, keep_on_gpu=0)
    return max_seq_len(ModelShape.from_hf(model), planner_setup(spec), int(cap_gib * GiB - CONTEXT_RESERVE), step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["speed", "context", "all"], default="speed")
    ap.add_argument("--stacks", default=None,
                    help="tunery (block inputs offloaded, blocks recomputed: the trainer's "
                         "gradient_checkpointing: offload), tunery_rc (same + the fused MLP recomputes gate/up "
                         "in backward: least memory), tunery_act (offload every saved activation, no block "
                         "recompute, gate/up recomputed), tunery_nokcat (tunery_act with LoRA B in its own GEMM), "
                         "standard, liger. Default: tunery_act,standard,liger for the speed part, tunery,standard,liger "
                         "for the context part (long rows offload block inputs)")
    ap.add_argument("--profile", action="store_true",
                    help="speed part: two extra steps (back to back) of each tunery variant under torch.profiler; the "
                         "top kernels by GPU time go to $OUT/profile_<stack>_<mode>.txt")
    ap.add_argument("--trace", action="store_true",
                    help="like --profile, plus a chrome trace ($OUT/profile_<stack>_<mode>.json.gz) and, at the "
                         "top of the profile, where the compute stream idles and why (benchmarks/trace_gaps.py)")
    ap.add_argument("--phases", action="store_true",
                    help="speed part: also time forward, backward and optimizer separately (synchronised)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    type=lambda kv: (kv.split("=", 1)[0], json.loads(kv.split("=", 1)[1])),
                    help="speed part: override a tunery worker setting, e.g. ckpt=false, mlp_recompute=true, "
                         "offload=\"activations\", keep_on_gpu=4 (diagnostics; JSON values)")
    ap.add_argument("--tag", default="", help="suffix for the files written under $OUT")
    ap.add_argument("--loss-sync", choices=["step", "end"], default="end",
                    help="speed part, every stack: read the loss every step (a host sync per step) or only "
                         "after the timed steps (lets the CPU run ahead into the next step, as the trainer "
                         "does: it copies each step's numbers to the host without waiting)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="speed part: run the stacks this many times in turn and report each one's median run")
    ap.add_argument("--modes", default=None, help="qlora,lora16 (speed default: qlora)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the code paths)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is present")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=7,
                    help="untimed steps (7: tunery's offload_save_mlp auto times steps 2 to 4 and takes effect in "
                         "step 5; the CUDA graph is captured at step 6)")
    ap.add_argument("--cap-gib", type=float, default=80.0, help="context part: GPU memory cap")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="context part: try exactly these lengths")
    ap.add_argument("--max-trials", type=int, default=6)
    ap.add_argument("--docs", type=int, default=1,
                    help="context part, tunery: split each row into this many documents (varlen attention). "
                         "Memory is the same (flash attention keeps O(tokens)); attention compute drops by the "
                         "factor: one 400k-token document is ~12 min of attention per step on an H200")
    ap.add_argument("--time-budget", type=float, default=3000, help="context part: seconds per search")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.set = dict(args.set)

    if args.worker:
        spec = json.loads(args.worker)
        try:
            res = worker(spec)
        except Exception as e:
            res = {k: v for k, v in spec.items() if k != "model"}
            oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
            res.update(ok=False, error="out of memory" if oom else repr(e)[:500],
                       stderr_tail=traceback.format_exc()[-3000:])
        Path(args.result).write_text(json.dumps(res))
        return

    import torch

    if os.environ.get("OUT"):  # the workers write their profiles there before the report is written
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.cpu = args.cpu or not torch.cuda.is_available()
        args.steps, args.warmup = min(args.steps, 2), 1
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    versions = {"torch": torch.__version__}
    from importlib import metadata

    for mod, dist in (("transformers", "transformers"), ("peft", "peft"), ("triton", "triton"),
                      ("bitsandbytes", "bitsandbytes"), ("liger_kernel", "liger-kernel")):
        try:  # importable, and its version (liger_kernel has no __version__: the distribution's)
            versions[mod] = getattr(__import__(mod), "__version__", None) or metadata.version(dist)
        except Exception:
            versions[mod] = None
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "versions": versions,
                    "smoke": args.smoke, "targets": TARGETS}
    print(f"device {report['device']}  {versions}", flush=True)
    default = {"speed": "tunery_act,standard,liger", "context": "tunery,standard,liger"}
    stacks = [s for s in (args.stacks or default.get(args.part, "tunery,tunery_act,standard,liger")).split(",") if s]
    if args.part in ("speed", "all"):
        modes = (args.modes or "qlora").split(",")
        print("== speed: seq 2048 x micro-batch 2" if not args.smoke else "== speed (smoke)", flush=True)
        sp = part_speed(args, stacks, modes)
        report["speed"] = sp
        for k in ("tunery_variant", "tunery_peak_gib", "peak_target_met", "planner_error", "speed_over_standard", "speed_target_met",
                  "memory_over_standard", "energy_per_token_over_standard", "standard_power_capped_share",
                  "speed_over_liger", "speed_over_standard_prep", "energy_per_token_over_standard_prep"):
            if k in sp:
                v = sp[k]
                print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}", flush=True)
    if args.part in ("context", "all"):
        modes = (args.modes or "qlora,lora16").split(",")
        print(f"== context: micro-batch 1 under a {args.cap_gib:g} GiB cap", flush=True)
        report["context"] = part_context(args, stacks, modes)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        name = f"memory{args.tag}.json"
        (Path(out_dir) / name).write_text(json.dumps(report, indent=2))
        print(f"wrote {Path(out_dir) / name}")


if __name__ == "__main__":
    main()
