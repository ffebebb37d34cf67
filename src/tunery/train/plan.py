"""Memory planner: predicted peak GPU memory of a run, per component, without loading weights.

    plan(config, gpu_mem_bytes) -> PlanReport        (reads config.json of base_model only)
    plan_shapes(hf_config_dict, setup, gpu_mem)      (shape-only, for benchmarks)
    format_report(report) -> str

The model is a sum of explicit terms in bytes, for Tunery's decoder with its fused kernels on a GPU
(fused norm+LoRA projections, flash varlen attention, fused MLP, fused linear cross-entropy).
N = micro_batch x sequence_len tokens; H hidden, I intermediate, V vocab, L layers;
u = N x H x 2 (one bf16 hidden-state tensor); a = q_dim / H, g = kv_dim / H, r = I / H.

  weights      decoder-block linears: 16-bit = 2 B/param; NF4 = 0.5 B + absmax (4/64 B, or with
               double quantization 1/64 + 4/(64 x 256) B); embeddings and LM head 16-bit (the input
               embedding counts 0 when it sits in CPU memory); norms. offload_weights: the streamed
               blocks' NF4 bytes count 0 but two blocks' (the one in use and the next one coming).
  adapters     LoRA params r x (in + out) per adapted linear, fp32 weights + fp32 grads (8 B/param);
               modules_to_save (and every param in full fine-tuning) count here too.
  optimizer    AdamW: two fp32 states per trained param (8 B/param).
  activations  (DoRA adds 2 x out / H units to S per adapted linear; a 4-bit base's dequantized weight is
               never kept)
               the peak is the larger of two moments:
               backward of one block: kept inputs of the other blocks (checkpointing off: their
               saved tensors S = (2 + 2a + 2g) u + 2r u for gate/up unless recomputed or chunked;
               on: u each; offload: keep_on_gpu x u, or S each with strategy "activations", + 2r u
               for each kept block that keeps gate/up) + ACT_SCALE x max(MLP phase, attention phase):
               MLP phase = S + incoming gradient u + (3r + 1) u for gate, up and dh (per chunk of
               mlp_chunk tokens when chunked, + u for the chunked MLP's input gradient); attention
               phase = S - u + 2u of gradients + FlashAttention-2's backward: do, dq, an fp32 dq
               accumulator (2a u), GQA-expanded dk/dv (2a u) and dk, dv; + u prefetched (offload);
               strategy "activations" takes the largest of three backward moments instead: an
               offloaded block (its S + the one before it coming back), the last block (every kept
               block alive, the copy back not started) and the kept block whose backward starts the
               copy back (PREFETCH_LEAD blocks alive); a block's own gate/up count in its MLP phase;
               + the adapters' gradients and twice the largest dequantized weight (QLoRA);
               end of forward (the loss): all kept inputs + 3u (last block output, final norm output,
               the loss's gradient wrt it) + 2u more when labels are ignored (gathered rows, full-size
               gradient) + one chunk of bf16 logits (rows = 128 MiB / (2V) rounded down to a power of
               2 in [128, 8192], kernels/cross_entropy.py).
  logits       that logits chunk, when the peak is at the loss.
  other        FIXED_OVERHEAD (cuBLAS workspaces, allocator rounding) + the dequantization scratch.

The calibration constants (ACT_SCALE, FIXED_OVERHEAD) are set from peaks measured on
one GPU (benchmarks/memory.py prints the prediction next to each measurement). The prediction is
torch.cuda.max_memory_allocated; "fits" also leaves CONTEXT_RESERVE for the CUDA context and the
caching allocator's fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

GiB = 1 << 30
MiB = 1 << 20

# calibration (see the module docstring)
ACT_SCALE = 1.0
FIXED_OVERHEAD = 256 * MiB
CE_BYTES_PER_LOGIT = 2     # the fused loss keeps one bf16 logits chunk (gradients written over it)
CONTEXT_RESERVE = 1 * GiB  # CUDA context + allocator slack when deciding "fits"
PREFETCH_LEAD = 2          # train/activations.py's: kept blocks of backward the last offloaded block's copy back overlaps

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    name: str = "model"

    @classmethod
    def from_hf(cls, hf: Any, name: str | None = None) -> ModelShape:
        d = hf if isinstance(hf, dict) else hf.to_dict()
        if "text_config" in d and "hidden_size" not in d:
            d = {**d["text_config"], "tie_word_embeddings": d.get("tie_word_embeddings", False)}
        heads = d["num_attention_heads"]
        return cls(vocab=d["vocab_size"], hidden=d["hidden_size"], intermediate=d["intermediate_size"],
                   layers=d["num_hidden_layers"], heads=heads, kv_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                   tied=bool(d.get("tie_word_embeddings", False)),
                   name=name or d.get("_name_or_path") or d.get("model_type", "model"))

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one block."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_dims().values())

    def total_params(self) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (self.linear_params() + 2 * self.hidden) + emb + self.hidden


@dataclass
class Setup:
    """What the run does, as far as memory is concerned."""

    seq_len: int = 2048
    micro_batch: int = 1
    adapter: str | None = "lora"        # lora | qlora | None (full fine-tuning)
    lora_r: int = 16
    targets: tuple[str, ...] = LINEARS
    double_quant: bool = False
    checkpointing: bool | str = False   # False | True | "offload"
    weight_bytes: int = 2               # frozen base dtype (bf16)
    train_bytes: int = 4                # trained params (fp32 adapters / master weights)
    act_bytes: int = 2                  # activations (bf16)
    mlp_chunk: int | None = None        # tokens per MLP chunk (None: not chunked)
    keep_on_gpu: int = 0                # offload mode: block inputs kept on the GPU
    embed_on_cpu: bool = False          # frozen input embedding held in CPU memory
    modules_to_save: tuple[str, ...] = ()
    mlp_recompute: bool = False         # fused MLP recomputes gate/up in backward (models.fused.set_mlp_recompute)
    ignored_labels: bool = True         # some labels are -100 (prompt masking): the loss gathers hidden states
    offload_strategy: str = "inputs"    # offload mode: "inputs" (recompute) or "activations" (activations.py)
    mlp_save_kept: int = 0              # "activations": kept blocks whose MLP keeps gate/up (on the GPU)
    mlp_save_offloaded: int | str = 0   # "activations": offloaded blocks whose MLP keeps gate/up (host memory);
                                        # "auto" (picked at run time): the GPU terms of one, host as for none
    ce_chunk: int | None = None         # rows per loss chunk (None: the kernel's own choice)
    dora: bool = False                  # DoRA adapters (peft_use_dora): more saved activations per layer
    stream_weights: int = 0             # offload mode, QLoRA: blocks whose 4-bit weights stay in CPU memory
    weights_mode: str = "stream"        # ... "stream" (two blocks' on the GPU at a time) or "gap" (the first N
                                        # leave after their forward, back during the backward: weight_stream.py)

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch


def _mode_name(mode: bool | str) -> str:
    return {False: "off", True: "on", "offload": "offload"}.get(mode, str(mode))


def estimate(shape: ModelShape, s: Setup) -> dict[str, dict[str, float]]:
    """Component -> {bytes, and the sub-terms that make it}. Pure arithmetic on shapes."""
    L, H, I, V = shape.layers, shape.hidden, shape.intermediate, shape.vocab  # noqa: E741
    N = s.tokens
    u = N * H * s.act_bytes
    lin = shape.linear_params()
    out: dict[str, dict[str, float]] = {}

    # weights
    streamed_b = 0.0
    gap, w_block = 0, 0.0  # weights_mode "gap": blocks whose weights are off the GPU at the loss (and after)
    if s.adapter == "qlora":
        scale_b = (1 / 64 + 4 / (64 * 256)) if s.double_quant else 4 / 64
        w_block = lin * (0.5 + scale_b)
        w_lin = L * w_block
        if s.checkpointing == "offload" and s.stream_weights and s.weights_mode == "gap":
            gap = min(s.stream_weights, L)
        elif s.checkpointing == "offload" and s.stream_weights and s.weights_mode == "stream":  # in CPU memory; two
            # blocks' on the GPU at a time ("lend" keeps every weight on the GPU: its gate/up go in their memory)
            streamed = min(s.stream_weights, L - min(L, s.keep_on_gpu))
            streamed_b = max(0, streamed - 2) * w_block
            w_lin -= streamed_b
    else:
        w_lin = L * lin * (s.weight_bytes if s.adapter else s.train_bytes)
    wb = s.weight_bytes if s.adapter else s.train_bytes
    embed = 0 if s.embed_on_cpu else V * H * wb
    head = 0 if shape.tied else V * H * wb
    norms = (2 * L + 1) * H * wb
    out["weights"] = {"bytes": w_lin + embed + head + norms, "linears": w_lin, "embed_tokens": embed,
                      "lm_head": head, "norms": norms, "linears_in_cpu_memory": streamed_b}

    # adapters / trained params
    dims = shape.linear_dims()
    if s.adapter:
        n_lora = L * sum(s.lora_r * (a + b) for name, (a, b) in dims.items() if name in s.targets)
        n_extra = sum(V * H for m in s.modules_to_save if m in ("lm_head", "embed_tokens"))
        trained = n_lora + n_extra
        out["adapters"] = {"bytes": trained * 2 * s.train_bytes, "params": trained, "lora_params": n_lora}
    else:  # full fine-tuning: the weights above are the trained params; their grads count here
        trained, n_lora = shape.total_params(), 0
        out["adapters"] = {"bytes": trained * s.train_bytes, "params": trained, "lora_params": 0}
    out["optimizer"] = {"bytes": trained * 8, "states": 2}

    # activations, in units of u (see the module docstring)
    a = shape.heads * shape.head_dim / H
    g = shape.kv_heads * shape.head_dim / H
    r = I / H
    frac = min(1.0, s.mlp_chunk / N) if s.mlp_chunk else 1.0
    x_stack = 2 + 2 * a + 2 * g                       # x, q, k, v, attention output, MLP input
    if s.adapter and s.dora:  # each DoRA layer also keeps its base and adapter outputs ([N, out] each;
        # adapters/lora.py LoRALinear._dora)
        x_stack += 2 * sum(dims[n][1] for n in s.targets if n in dims) / H
    gate_up = 0.0 if (s.mlp_recompute or s.mlp_chunk) else 2 * r
    block_saved = x_stack + gate_up
    act_offload = s.checkpointing == "offload" and s.offload_strategy == "activations"
    keep = min(L, s.keep_on_gpu)
    save_kept = min(keep, s.mlp_save_kept) if act_offload else 0
    auto = s.mlp_save_offloaded == "auto"
    save_off = (1 if auto else min(L - keep, int(s.mlp_save_offloaded))) if act_offload else 0
    gu_saved = 2 * r if (act_offload and gate_up == 0) else 0.0  # what a block that keeps gate/up adds
    prefetch = (block_saved if act_offload else 1.0) if s.checkpointing == "offload" else 0.0
    if save_off:  # the block coming back may be one that kept gate/up
        prefetch += gu_saved
    mlp_bwd = (3 * r + 1) * frac + (1.0 if frac < 1 else 0.0)  # gate, up, dh (+ grad_x of a chunked MLP)
    attn_bwd = 4 * a + (2 * a if g < a else 0.0) + 2 * g     # do, dq, fp32 dq accumulator, GQA dk/dv, dk, dv
    mlp_phase = x_stack + gate_up + 1 + mlp_bwd               # + the incoming gradient
    attn_phase = (x_stack - 1) + 2 + attn_bwd                 # MLP input freed; two gradients in flight
    work = ACT_SCALE * max(mlp_phase, attn_phase)              # one block's backward, its own saved tensors included
    block_bwd = (work + prefetch) * u
    bwd_absent = 0.0  # weights_mode "gap": weights off the GPU at the backward's peak moment
    if not s.checkpointing:
        kept_bwd, kept_fwd = (L - 1) * block_saved * u, L * block_saved * u
    elif s.checkpointing is True:
        kept_bwd, kept_fwd = (L - 1) * u, L * u
    elif act_offload:  # every saved tensor of a block goes to host memory; kept blocks keep theirs
        # at the loss: the kept blocks, and the copies still in flight at the end of forward (the last
        # offloaded block keeps gate/up when any does)
        kept_fwd = (keep * block_saved + save_kept * gu_saved + block_saved + (gu_saved if save_off else 0)) * u
        # backward: the largest of its moments (the kept blocks that keep gate/up are the last ones; a
        # block's own gate/up are the ones its MLP backward works on, counted in `work`). Each is (bytes,
        # weights still off the GPU then, with weights_mode "gap").
        lead = min(keep, PREFETCH_LEAD)
        pre = prefetch if keep < L else 0.0
        moments = [((work + pre) * u, 0.0)]  # an offloaded block, the one before it coming back (weights all back)
        back = gap_returned(L, gap, keep)
        for j in range(L - 1, L - 1 - keep, -1):  # each kept block's backward, every kept one before it alive;
            # the copy back starts with the kept block `lead` before the offloaded ones (or at once)
            alive = j - (L - keep)
            copying = pre if (j <= L - keep + lead - 1 or keep <= PREFETCH_LEAD) else 0.0
            act = work + alive * block_saved + max(0, j - (L - save_kept)) * gu_saved + copying
            moments.append((act * u, (gap - back.get(j, 0)) * w_block))
        block_bwd, bwd_absent = max(moments, key=lambda m: m[0] - m[1])  # the moments count the kept blocks
        kept_bwd = 0.0
    else:
        kept_bwd = kept_fwd = keep * u
    host = 0
    if s.checkpointing == "offload":
        host = (L - keep) * u * (block_saved if act_offload else 1) + (0 if auto else save_off * gu_saved * u)

    # the loss at the end of forward: last block output, final norm output, the loss's gradient of it
    # (+ gathered hidden states and a full-size gradient when some labels are ignored), one logits chunk
    chunk = min(N, s.ce_chunk or ce_chunk_rows(V))
    logits = chunk * V * CE_BYTES_PER_LOGIT
    loss_act = kept_fwd + (3 + (2 if s.ignored_labels else 0)) * u
    scratch = 2 * max(x * y for x, y in dims.values()) * s.act_bytes if s.adapter == "qlora" else 0
    grads = trained * s.train_bytes
    bwd_total = kept_bwd + block_bwd + grads + scratch
    loss_total = loss_act + logits
    at_loss = loss_total - gap * w_block > bwd_total - bwd_absent
    absent = gap * w_block if at_loss else bwd_absent
    if absent:
        out["weights"]["bytes"] -= absent
        out["weights"]["linears"] -= absent
        out["weights"]["linears_in_cpu_memory"] = absent
    params_b = trained * s.train_bytes if s.adapter else 0  # full fine-tuning: already in "weights"
    if s.adapter and s.train_bytes != s.act_bytes:  # the fused paths' cached compute-dtype copy (kernels.cast_params)
        params_b += n_lora * s.act_bytes
    out["adapters"] = {"bytes": params_b + (0 if at_loss else grads), "params": trained, "lora_params": n_lora}
    static = out["weights"]["bytes"] + params_b + out["optimizer"]["bytes"] + FIXED_OVERHEAD
    out["activations"] = {"bytes": loss_act if at_loss else kept_bwd + block_bwd, "block_inputs": kept_fwd,
                          "one_block": block_bwd, "host_bytes": host, "peak_phase": "loss" if at_loss else "backward",
                          "loss_phase_total": static + loss_total - (0 if at_loss else gap * w_block - absent),
                          "backward_phase_total": static + bwd_total - (bwd_absent - absent if at_loss else 0)}
    out["logits"] = {"bytes": logits if at_loss else 0, "chunk_tokens": chunk, "chunk_bytes": logits}
    out["other"] = {"bytes": FIXED_OVERHEAD + (0 if at_loss else scratch), "dequant_scratch": scratch}
    return out


def gap_returned(layers: int, dropped: int, keep_on_gpu: int) -> dict[int, int]:
    """weights_mode "gap": block j -> how many dropped blocks' weights are back when its backward runs
    (train/weight_stream.py's gap_returns schedule, counted from block L - 1 down)."""
    if not dropped:
        return {}
    from .weight_stream import gap_returns

    sched, out, n = gap_returns(layers, dropped, keep_on_gpu), {}, 0
    for j in range(layers - 1, -1, -1):
        n += len(sched.get(j, ()))
        out[j] = n
    return out


def ce_chunk_rows(vocab: int) -> int:
    """Rows per chunk of the fused linear cross-entropy (kept in step with kernels/cross_entropy.py's
    _chunk_rows; a test checks it): about 128 MiB of bf16 logits."""
    rows = (128 << 20) // max(1, 2 * vocab)
    return max(128, min(8192, 1 << max(rows, 1).bit_length() - 1))


def peak_bytes(shape: ModelShape, s: Setup) -> int:
    return int(sum(c["bytes"] for c in estimate(shape, s).values()))


def max_seq_len(shape: ModelShape, s: Setup, budget: int, step: int = 1024, cap: int = 1 << 24) -> int:
    """Longest sequence (multiple of `step`) at s.micro_batch whose predicted peak fits `budget`."""
    lo, hi = 0, cap // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak_bytes(shape, replace(s, seq_len=mid * step)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def best_save_kept(shape: ModelShape, s: Setup, budget: int) -> int:
    """Strategy "activations": how many of the kept blocks can also keep gate/up within `budget`."""
    best = 0
    for k in range(min(s.keep_on_gpu, shape.layers) + 1):
        if peak_bytes(shape, replace(s, mlp_save_kept=k)) <= budget:
            best = k
    return best


def best_keep_on_gpu(shape: ModelShape, s: Setup, budget: int) -> int:
    """Offload mode: how many block inputs can stay on the GPU (fewer host copies) within `budget`."""
    best = 0
    for k in range(shape.layers + 1):
        if peak_bytes(shape, replace(s, checkpointing="offload", keep_on_gpu=k)) <= budget:
            best = k
    return best


GAP_RETURNS_PER_BLOCK = 4  # best_weight_gap: at most this many blocks' weights come back per block of backward


def best_weight_gap(shape: ModelShape, s: Setup, budget: int) -> tuple[int, int, int] | None:
    """Strategy "activations", QLoRA: (offload_weights, offload_keep_on_gpu, offload_save_mlp_kept) with
    offload_weights_mode "gap" that fit `budget`, or None: the most kept blocks keeping gate/up (each saves
    its recompute and costs no PCIe), then the lowest predicted peak. The weights come back during the
    kept blocks' backward, at most GAP_RETURNS_PER_BLOCK per block (~4.5 ms of PCIe for an 8B block
    against ~4-5 ms of its backward). Measured (H200, 8B, 2 x 2048, 7 GiB; benchmarks/RESULTS.md):
    (24, 11, 10) ran +4.6% to +8.3% tokens/s over (0, 7, 1) in one-round pairs on three machines, but
    this pick (24, 10, 10) ran 11.0k-14.5k in five rounds: offload_save_mlp "auto" fills the copies out
    that the kept blocks free, and where it picked 11-22 blocks the backward's copies back held the step
    up. Not suggested by `tunery plan` for that reason; memory.py --set gap=true runs it."""
    from .weight_stream import gap_returns

    if s.adapter != "qlora" or s.checkpointing != "offload" or s.offload_strategy != "activations":
        return None
    L = shape.layers  # noqa: E741
    best, key = None, None
    for n in range(0, L - 1):
        for keep in range(2, L):
            sched = gap_returns(L, n, keep)
            if sched and max(len(v) for v in sched.values()) > GAP_RETURNS_PER_BLOCK:
                continue
            t = replace(s, stream_weights=n, weights_mode="gap", keep_on_gpu=keep, mlp_save_kept=0)
            if peak_bytes(shape, t) > budget:
                continue
            saves = best_save_kept(shape, t, budget)
            k = (saves, -peak_bytes(shape, replace(t, mlp_save_kept=saves)))
            if key is None or k > key:
                best, key = (n, keep, saves), k
    return best


@dataclass
class PlanReport:
    shape: ModelShape
    setup: Setup
    gpu_mem: int
    components: dict[str, dict[str, float]]
    peak: int
    fits: bool
    per_mode: dict[str, dict[str, int]] = field(default_factory=dict)
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.shape.name, "peak_bytes": self.peak, "gpu_mem_bytes": self.gpu_mem, "fits": self.fits,
                "components": {k: int(v["bytes"]) for k, v in self.components.items()},
                "per_mode": self.per_mode, "suggestions": self.suggestions}


def plan_shapes(hf_config: Any, setup: Setup, gpu_mem_bytes: int, name: str | None = None) -> PlanReport:
    """Shape-only planning from an HF config (dict or PretrainedConfig)."""
    shape = ModelShape.from_hf(hf_config, name)
    budget = gpu_mem_bytes - CONTEXT_RESERVE
    comps = estimate(shape, setup)
    peak = int(sum(c["bytes"] for c in comps.values()))
    report = PlanReport(shape, setup, gpu_mem_bytes, comps, peak, peak <= budget)
    chunk = setup.mlp_chunk or 8192
    for mode in (False, True, "offload"):
        s = replace(setup, checkpointing=mode, keep_on_gpu=0 if mode == "offload" else setup.keep_on_gpu)
        mb = 0
        while mb < 256 and peak_bytes(shape, replace(s, micro_batch=mb + 1)) <= budget:
            mb += 1
        report.per_mode[_mode_name(mode)] = {
            "peak_bytes": peak_bytes(shape, s),
            "max_micro_batch": mb,
            "max_seq_len_mb1": max_seq_len(shape, replace(s, micro_batch=1), budget),
            "max_seq_len_mb1_mlp_chunked": max_seq_len(shape, replace(s, micro_batch=1, mlp_chunk=chunk), budget),
        }
    _suggest(report, budget)
    return report


def _suggest(r: PlanReport, budget: int) -> None:
    s, shape = r.setup, r.shape
    if r.fits:
        r.suggestions.append(f"fits: predicted peak {_gib(r.peak)} of {_gib(r.gpu_mem)}")
        if s.checkpointing == "offload":
            keep = best_keep_on_gpu(shape, s, budget)
            if s.keep_on_gpu < keep < shape.layers:  # all of them: "gradient_checkpointing: false" below says it
                r.suggestions.append(f"offload_keep_on_gpu: {keep} also fits (the last {keep} blocks stay on "
                                     f"the GPU: fewer host copies; predicted "
                                     f"{_gib(peak_bytes(shape, replace(s, keep_on_gpu=keep)))})")
            else:
                keep = s.keep_on_gpu
            if s.offload_strategy == "activations" and s.mlp_recompute and 0 < keep < shape.layers:
                with_keep = replace(s, keep_on_gpu=keep)
                saves = best_save_kept(shape, with_keep, budget)
                if saves > min(s.mlp_save_kept, keep):
                    r.suggestions.append(f"offload_save_mlp_kept: {saves} also fits with offload_keep_on_gpu: {keep} "
                                         f"(the last {saves} kept blocks keep gate/up: less recompute; predicted "
                                         f"{_gib(peak_bytes(shape, replace(with_keep, mlp_save_kept=saves)))})")
        if s.checkpointing:
            for mode in (False, True):
                if mode == s.checkpointing or (mode is True and s.checkpointing is True):
                    break
                if peak_bytes(shape, replace(s, checkpointing=mode)) <= budget:
                    r.suggestions.append(f"gradient_checkpointing: {str(mode).lower()} also fits and is faster "
                                         f"(no recomputation)" if mode is False else
                                         "gradient_checkpointing: true also fits (no host copies)")
                    break
        return
    for mode in (False, True, "offload"):
        for chunk in (None, 8192):
            t = replace(s, checkpointing=mode, mlp_chunk=chunk or s.mlp_chunk)
            if peak_bytes(shape, t) <= budget:
                extra = f", MLP chunked by {chunk} tokens" if chunk else ""
                r.suggestions.append(f"gradient_checkpointing: {_cfg_value(mode)}{extra} fits at micro_batch_size "
                                     f"{s.micro_batch} (predicted {_gib(peak_bytes(shape, t))})")
                return
    t = replace(s, checkpointing="offload", mlp_chunk=s.mlp_chunk or 8192)
    n = _streamed_fit(shape, t, budget)
    if n:  # the same micro-batch with the 4-bit weights streamed: ~5% slower, where accumulation costs more
        mode = "" if s.weights_mode == "stream" else " and offload_weights_mode: stream"
        r.suggestions.append(f"gradient_checkpointing: offload with offload_weights: {n}{mode} fits at micro_batch_size "
                             f"{s.micro_batch} (predicted "
                             f"{_gib(peak_bytes(shape, replace(t, stream_weights=n, weights_mode='stream')))})")
        return
    mb = _largest_micro_batch(shape, t, budget)
    if peak_bytes(shape, replace(t, micro_batch=mb)) > budget and s.adapter == "qlora":
        t = replace(t, stream_weights=shape.layers, keep_on_gpu=0, weights_mode="stream")
        mb = _largest_micro_batch(shape, t, budget)
    if peak_bytes(shape, replace(t, micro_batch=mb)) <= budget:
        acc = math.ceil(s.micro_batch / mb)
        streamed = f", offload_keep_on_gpu: 0 and offload_weights: {shape.layers}" if t.stream_weights else ""
        r.suggestions.append(f"micro_batch_size: {mb} with gradient_accumulation_steps x{acc} and "
                             f"gradient_checkpointing: offload{streamed} fits (predicted "
                             f"{_gib(peak_bytes(shape, replace(t, micro_batch=mb)))})")
        return
    t = replace(s, micro_batch=1, checkpointing="offload", mlp_chunk=8192)
    if s.adapter == "qlora":
        t = replace(t, stream_weights=shape.layers, keep_on_gpu=0, weights_mode="stream")
    longest = max_seq_len(shape, t, budget)
    if longest:
        streamed = f", offload_keep_on_gpu: 0, offload_weights: {shape.layers}" if t.stream_weights else ""
        r.suggestions.append(f"does not fit at sequence_len {s.seq_len}; the longest that fits is about "
                             f"{longest} tokens (micro_batch_size 1, offload{streamed}, chunked MLP)")
    elif s.adapter == "qlora":
        r.suggestions.append("does not fit even with every 4-bit weight streamed from CPU memory: more GPUs (fsdp)")
    else:
        r.suggestions.append("the weights alone do not fit: use adapter: qlora with load_in_4bit, "
                             "or more GPUs (fsdp)")
    if s.adapter != "qlora" and s.adapter:
        q = replace(s, adapter="qlora", double_quant=True)
        if peak_bytes(shape, q) <= budget:
            r.suggestions.append(f"adapter: qlora + load_in_4bit fits (predicted {_gib(peak_bytes(shape, q))})")


def _largest_micro_batch(shape: ModelShape, s: Setup, budget: int) -> int:
    """The largest micro-batch up to s.micro_batch that fits `budget` (1 when none does)."""
    mb = s.micro_batch
    while mb > 1 and peak_bytes(shape, replace(s, micro_batch=mb)) > budget:
        mb -= 1
    return mb


def _streamed_fit(shape: ModelShape, s: Setup, budget: int) -> int:
    """The fewest blocks whose 4-bit weights must stream from host memory (offload_weights) for `s`
    (QLoRA, offload) to fit `budget`; 0 when it is not QLoRA or no count fits."""
    if s.adapter != "qlora" or s.checkpointing != "offload":
        return 0
    n_off = shape.layers - min(shape.layers, s.keep_on_gpu)
    for n in range(3, n_off + 1):  # two blocks' weights stay on the GPU: fewer than three frees nothing
        if peak_bytes(shape, replace(s, stream_weights=n, weights_mode="stream")) <= budget:
            return n
    return 0


def _cfg_value(mode: bool | str) -> str:
    return "offload" if mode == "offload" else str(bool(mode)).lower()


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def setup_from_config(cfg: Any, hidden: int | None = None, **overrides: Any) -> Setup:
    """The memory-relevant settings of a tunery Config (`hidden`: the model's, to resolve
    offload_strategy "auto")."""
    from ..adapters import target_names

    adapter = cfg.adapter
    if adapter and cfg.load_in_4bit:
        adapter = "qlora"
    elif adapter == "qlora":
        adapter = "lora"
    half = cfg.fp16 or cfg.bf16 in (True, "auto")
    kw = dict(seq_len=cfg.sequence_len, micro_batch=cfg.micro_batch_size, adapter=adapter, lora_r=cfg.lora_r,
              targets=tuple(target_names(cfg.lora_target_modules, cfg.lora_target_linear)),
              double_quant=cfg.bnb_4bit_use_double_quant, checkpointing=cfg.gradient_checkpointing,
              weight_bytes=2 if half else 4, act_bytes=2 if half else 4,
              modules_to_save=tuple(cfg.lora_modules_to_save or ()),
              mlp_chunk=8192 if cfg.gradient_checkpointing else None,  # activations.py's "auto"
              keep_on_gpu=getattr(cfg, "offload_keep_on_gpu", 0),
              mlp_save_offloaded=getattr(cfg, "offload_save_mlp", 0),
              mlp_save_kept=getattr(cfg, "offload_save_mlp_kept", 0),
              dora=bool(getattr(cfg, "peft_use_dora", False)),
              stream_weights=getattr(cfg, "offload_weights", 0),
              weights_mode=getattr(cfg, "offload_weights_mode", "stream"))
    strategy = getattr(cfg, "offload_strategy", "inputs")
    if strategy == "auto":  # OffloadCheckpoint.pick, less its host-memory check (unknown here)
        big = (hidden or 0) >= 3072 and kw["seq_len"] * kw["micro_batch"] <= 32768
        strategy = "activations" if big else "inputs"
    if cfg.gradient_checkpointing == "offload" and strategy == "activations":
        kw.update(offload_strategy="activations", mlp_recompute=True)
    kw.update(overrides)
    return Setup(**kw)


def plan(config: Any, gpu_mem_bytes: int | None = None, **setup_overrides: Any) -> PlanReport:
    """Plan a run from a tunery Config (or a YAML path / dict). Reads config.json only."""
    from transformers import AutoConfig

    from ..config import load_config
    from ..models import resolve_model_path

    cfg = load_config(config)
    path = resolve_model_path(cfg.base_model_config or cfg.base_model)
    hf = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    if gpu_mem_bytes is None:
        gpu_mem_bytes = detect_gpu_memory()
    setup = setup_from_config(cfg, hidden=ModelShape.from_hf(hf).hidden, **setup_overrides)
    if "embed_on_cpu" not in setup_overrides and setup.adapter == "qlora":
        # the trainer keeps a frozen, untied input embedding in CPU memory under QLoRA (quant.offload_embedding)
        setup = replace(setup, embed_on_cpu=not ModelShape.from_hf(hf).tied)
    report = plan_shapes(hf, setup, gpu_mem_bytes, name=str(cfg.base_model))
    if cfg.fsdp:
        report.notes.append("fsdp is set: this plan is for one GPU holding the whole model (no sharding)")
    if not cfg.own_decoder or hf.model_type not in _own_types():
        report.notes.append("the transformers fallback (not Tunery's decoder) uses more activation memory "
                            "than predicted here")
    return report


def _own_types() -> set[str]:
    from ..models.registry import OWN_FAMILIES

    return set(OWN_FAMILIES)


def detect_gpu_memory() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
    except Exception:
        pass
    return 24 * GiB


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """'24GiB', '80GB', '24g', '24' (GiB when no unit) -> bytes. 'g' alone means GiB, like nvidia-smi."""
    if isinstance(text, int):
        return text
    t = str(text).strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if not num:
        raise ValueError(f"--gpu-mem {text!r}: expected a size like 24GiB or 80GB")
    if unit in ("", "g"):
        unit = "gib"
    if unit not in _UNITS:
        raise ValueError(f"--gpu-mem {text!r}: unknown unit {unit!r} (use GiB, GB, MiB)")
    return int(float(num) * _UNITS[unit])


def format_report(r: PlanReport) -> str:
    s, sh = r.setup, r.shape
    c = r.components
    lines = [f"Memory plan: {sh.name} ({sh.total_params() / 1e9:.2f}B params, {sh.layers} layers, hidden {sh.hidden}, "
             f"vocab {sh.vocab})"]
    what = {"qlora": "QLoRA (NF4" + (" + double quant" if s.double_quant else "") + ")", "lora": "LoRA (16-bit base)",
            None: "full fine-tuning"}[s.adapter]
    if s.adapter:
        what += f", r={s.lora_r} on {len(s.targets)} module types"
    ckpt = _mode_name(s.checkpointing)
    if s.checkpointing == "offload":
        ckpt += f" ({s.offload_strategy}" + (f", last {s.keep_on_gpu} blocks kept on the GPU" if s.keep_on_gpu else "") + ")"
    lines.append(f"  {what}; {s.seq_len} tokens x micro-batch {s.micro_batch}; gradient checkpointing "
                 f"{ckpt}" + (f"; MLP chunks of {s.mlp_chunk}" if s.mlp_chunk else ""))
    w, a, act = c["weights"], c["adapters"], c["activations"]
    detail = {
        "weights": f"linears {_gib(w['linears'])}"
                   + (f" (+{_gib(w['linears_in_cpu_memory'])} in CPU memory, offload_weights)"
                      if w["linears_in_cpu_memory"] else "") + f", embed_tokens {_gib(w['embed_tokens'])}"
                   + (" (in CPU memory)" if s.embed_on_cpu else "") + f", lm_head {_gib(w['lm_head'])}",
        "adapters": f"{a['params'] / 1e6:.1f}M trained params" + (", weights + grads" if act["peak_phase"] == "backward"
                                                                    else " (no grads yet at the loss)"),
        "optimizer": "AdamW, 2 fp32 states per trained param",
        "activations": (f"kept block inputs {_gib(act['block_inputs'])}, one block's backward {_gib(act['one_block'])}"
                        if act["peak_phase"] == "backward" else
                        f"at the loss: kept block inputs {_gib(act['block_inputs'])} + last hidden states")
                       + (f"; {_gib(act['host_bytes'])} in CPU memory" if act["host_bytes"] else ""),
        "logits": f"bf16 chunk of {int(c['logits']['chunk_tokens'])} rows"
                  + ("" if c["logits"]["bytes"] else f" ({_gib(c['logits']['chunk_bytes'])}, not at the peak)"),
        "other": "workspaces" + (f", dequantization scratch {_gib(c['other']['dequant_scratch'])}"
                                 if c["other"]["dequant_scratch"] else ""),
    }
    label = {"optimizer": "optimizer state"}
    for k, v in c.items():
        lines.append(f"  {label.get(k, k):<16}{_gib(v['bytes']):>12}   {detail[k]}")
    lines.append(f"  {'peak':<16}{_gib(r.peak):>12}   at the {act['peak_phase']} (loss moment "
                 f"{_gib(act['loss_phase_total'])}, backward {_gib(act['backward_phase_total'])})")
    lines.append(f"  {'':<16}{'':>12}   of {_gib(r.gpu_mem)} "
                 f"({'fits' if r.fits else 'does NOT fit'}; {_gib(CONTEXT_RESERVE)} kept for the CUDA context)")
    lines.append("  by checkpointing mode (same settings):")
    for mode, m in r.per_mode.items():
        lines.append(f"    {mode:<8} peak {_gib(m['peak_bytes']):>10}   max micro-batch {m['max_micro_batch']:>3}   "
                     f"longest row at micro-batch 1: {m['max_seq_len_mb1']} tokens "
                     f"({m['max_seq_len_mb1_mlp_chunked']} with the MLP chunked)")
    for sug in r.suggestions:
        lines.append(f"  -> {sug}")
    for note in r.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def plan_cli(config_path: str, gpu_mem: str | None = None, overrides: list[str] | None = None) -> str:
    """What `tunery plan CONFIG [--gpu-mem 24GiB] [key=value ...]` prints."""
    from ..config import load_config

    cfg = load_config(config_path, overrides)
    return format_report(plan(cfg, parse_bytes(gpu_mem) if gpu_mem else None))


__all__ = ["ModelShape", "PlanReport", "Setup", "best_keep_on_gpu", "best_save_kept", "best_weight_gap", "estimate", "format_report",
           "max_seq_len", "parse_bytes", "peak_bytes", "plan", "plan_cli", "plan_shapes", "setup_from_config"]
