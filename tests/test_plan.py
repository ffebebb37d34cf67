"""The memory planner: its byte counts match real objects, its modes order sensibly, its report prints."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tunery.train.plan import (
    GiB,
    ModelShape,
    Setup,
    estimate,
    format_report,
    max_seq_len,
    parse_bytes,
    peak_bytes,
    plan,
    plan_shapes,
)

LLAMA_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                tie_word_embeddings=False)
TINY = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * GiB
    assert parse_bytes("24g") == 24 * GiB and parse_bytes("24") == 24 * GiB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512 MiB") == 512 << 20
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_shape_counts_8b():
    sh = ModelShape.from_hf(LLAMA_8B)
    assert sh.total_params() == 8_030_261_248  # Llama-3.1-8B
    e = estimate(sh, Setup(adapter="qlora", double_quant=True, lora_r=16))
    assert e["adapters"]["lora_params"] == 41_943_040  # what peft reports for r=16 on all linears
    assert e["weights"]["linears"] / GiB == pytest.approx(3.35, abs=0.01)


def test_weight_and_adapter_bytes_match_real_objects():
    """NF4 storage and LoRA parameter counts predicted == what quantize_model / inject_lora create."""
    from tunery.adapters import LINEAR_NAMES, inject_lora
    from tunery.models.decoder import CausalLM
    from tunery.models.registry import decoder_config
    from tunery.quant import quantize_model, quantized_bytes

    sh = ModelShape.from_hf(TINY)
    for dq in (False, True):
        m = CausalLM(decoder_config(TINY))
        inject_lora(m, list(LINEAR_NAMES), 8, 16)
        quantize_model(m, double_quant=dq)
        e = estimate(sh, Setup(adapter="qlora", lora_r=8, double_quant=dq))
        real = quantized_bytes(m)
        assert abs(e["weights"]["linears"] - real) / real < 0.01
        n_lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
        assert e["adapters"]["lora_params"] == n_lora
        # fp32 params + fp32 grads + the bf16 copy the fused paths cache (kernels.cast_params)
        assert e["adapters"]["bytes"] == n_lora * (4 + 4 + 2) and e["optimizer"]["bytes"] == n_lora * 8


def test_modes_and_chunking_order():
    sh = ModelShape.from_hf(LLAMA_8B)
    base = Setup(seq_len=8192, micro_batch=1, adapter="qlora", double_quant=True)
    off, on, offload = (peak_bytes(sh, replace(base, checkpointing=m)) for m in (False, True, "offload"))
    assert off > on > offload
    assert peak_bytes(sh, replace(base, checkpointing="offload", mlp_chunk=2048)) < offload
    assert peak_bytes(sh, replace(base, embed_on_cpu=True)) < peak_bytes(sh, base)
    lora16 = peak_bytes(sh, replace(base, adapter="lora"))
    assert lora16 - peak_bytes(sh, base) > 9 * GiB  # 16-bit base vs NF4
    # a bigger budget never shortens the longest row
    s = replace(base, checkpointing="offload", mlp_chunk=8192, embed_on_cpu=True)
    assert max_seq_len(sh, s, 40 * GiB) <= max_seq_len(sh, s, 80 * GiB)
    assert max_seq_len(sh, s, 79 * GiB) >= 400_000  # the 8B QLoRA long-context target is in reach


def test_report_fits_and_suggestions():
    s = Setup(seq_len=4096, micro_batch=8, adapter="lora", checkpointing=False)
    small = plan_shapes(LLAMA_8B, s, 24 * GiB, name="llama-8b")
    assert not small.fits and small.suggestions
    text = format_report(small)
    for word in ("weights", "adapters", "optimizer state", "activations", "logits", "does NOT fit"):
        assert word in text
    assert any("qlora" in x or "micro_batch_size" in x or "checkpointing" in x for x in small.suggestions)
    big = plan_shapes(LLAMA_8B, replace(s, micro_batch=1, checkpointing=True), 141 * GiB)
    assert big.fits and "fits" in format_report(big)
    d = big.to_dict()
    assert set(d["components"]) == {"weights", "adapters", "optimizer", "activations", "logits", "other"}
    assert set(big.per_mode) == {"off", "on", "offload"}


def test_plan_from_config_reads_only_config_json(tmp_path, tiny_llama):
    cfg = {"base_model": str(tiny_llama), "adapter": "qlora", "load_in_4bit": True, "lora_r": 8,
           "lora_target_linear": True, "sequence_len": 512, "micro_batch_size": 2,
           "gradient_checkpointing": "offload", "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    r = plan(cfg, 8 * GiB)
    assert r.setup.adapter == "qlora" and r.setup.checkpointing == "offload" and r.setup.tokens == 1024
    assert r.shape.layers == 2 and r.fits
    assert "QLoRA" in format_report(r)
    assert not r.setup.embed_on_cpu  # tied: the table is also the LM head, so the trainer keeps it on the GPU
    (tmp_path / "untied").mkdir()
    conf = json.loads((tiny_llama / "config.json").read_text())
    (tmp_path / "untied" / "config.json").write_text(json.dumps({**conf, "tie_word_embeddings": False}))
    r2 = plan({**cfg, "base_model": str(tmp_path / "untied")}, 8 * GiB)
    assert r2.setup.embed_on_cpu  # QLoRA: the trainer moves a frozen, untied input embedding to CPU memory
    assert plan({**cfg, "base_model": str(tmp_path / "untied"), "adapter": "lora", "load_in_4bit": False},
                8 * GiB).setup.embed_on_cpu is False


def test_plan_follows_the_offload_strategy_and_suggests_kept_blocks(tiny_llama):
    """offload_strategy: activations plans host copies of every saved activation (with gate/up
    recomputed), "auto" resolves by the hidden size as the trainer does, offload_keep_on_gpu is read,
    and an offload plan that fits says how many blocks could stay on the GPU."""
    from tunery.config import load_config
    from tunery.train.plan import CONTEXT_RESERVE, peak_bytes, setup_from_config

    cfg = {"base_model": str(tiny_llama), "adapter": "lora", "lora_r": 8, "lora_target_linear": True,
           "sequence_len": 512, "micro_batch_size": 2, "gradient_checkpointing": "offload",
           "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    inputs = plan(cfg, 8 * GiB)
    act = plan({**cfg, "offload_strategy": "activations"}, 8 * GiB)
    assert inputs.setup.offload_strategy == "inputs" and not inputs.setup.mlp_recompute
    assert act.setup.offload_strategy == "activations" and act.setup.mlp_recompute
    assert act.components["activations"]["host_bytes"] > 3 * inputs.components["activations"]["host_bytes"]
    assert plan({**cfg, "offload_strategy": "auto"}, 8 * GiB).setup.offload_strategy == "inputs"  # tiny hidden
    big = setup_from_config(load_config({**cfg, "offload_strategy": "auto"}), hidden=4096)
    assert big.offload_strategy == "activations" and big.mlp_recompute
    kept = plan({**cfg, "offload_keep_on_gpu": 1}, 8 * GiB)
    assert kept.setup.keep_on_gpu == 1 and kept.peak > inputs.peak
    # every block fits on the GPU: no offload_keep_on_gpu line, "gradient_checkpointing: false" says it
    assert not any(x.startswith("offload_keep_on_gpu") for x in inputs.suggestions), inputs.suggestions
    assert any(x.startswith("gradient_checkpointing: false") for x in inputs.suggestions)
    room_for_one = peak_bytes(inputs.shape, replace(inputs.setup, keep_on_gpu=1)) + CONTEXT_RESERVE + 1
    tight = plan(cfg, room_for_one)
    assert any(x.startswith("offload_keep_on_gpu: 1 ") for x in tight.suggestions), tight.suggestions


@pytest.mark.gpu
def test_gpu_planner_within_15_percent():
    """One QLoRA + offload step of a mid-size Llama on the GPU: measured peak vs the planner."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import memory as bench

    model = dict(LLAMA_8B, num_hidden_layers=8)
    for mode, seq, batch in (("qlora", 2048, 2), ("qlora", 32768, 1), ("lora16", 32768, 1)):
        spec = dict(stack="tunery", mode=mode, seq=seq, batch=batch, model=model, warmup=2, steps=0,
                    ckpt="offload", mlp_chunk=8192 if seq > 16384 else None)
        res = bench.run_worker(spec, 900)
        assert res.get("ok"), res
        print(f"{mode} {seq}x{batch}: measured {res['peak_gib']:.2f} GiB, planner {res['predicted_gib']:.2f} GiB")
        assert abs(res["predicted_gib"] / res["peak_gib"] - 1) <= 0.15
    torch.cuda.empty_cache()


def test_benchmark_energy_ratio_uses_median_power_over_speed():
    """memory.py's energy-per-token ratio: the standard stack's J/token over Tunery's (session 16's call b:
    684 W at 7,472 tok/s against 690 W at 13,835), and nothing without clock samples (CPU runs)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import memory as bench

    fast = {"tokens_per_s": 13835.0, "gpu_clocks": {"power_w_median": 690.0, "power_capped_share": 1.0}}
    slow = {"tokens_per_s": 7472.0, "gpu_clocks": {"power_w_median": 684.0, "power_capped_share": 0.9}}
    assert bench.energy_over(fast, slow) == pytest.approx((684 / 7472) / (690 / 13835))
    assert 1.83 < bench.energy_over(fast, slow) < 1.85
    assert bench.energy_over(fast, {"tokens_per_s": 7472.0}) is None
    assert bench.energy_over({**fast, "tokens_per_s": None}, slow) is None


def test_blocks_that_keep_gate_up_add_their_tensors_where_they_live():
    """Strategy "activations": kept blocks that keep gate/up (the last ones) add 2 x [tokens, intermediate]
    each to the loss phase, and to the backward peak all but the last block's (its MLP backward holds
    gate/up anyway); offloaded ones add them to host memory and (one coming back, one in flight) to the
    GPU; "auto" counts the GPU terms of one and no host memory (the count is picked at run time)."""
    sh = ModelShape.from_hf(LLAMA_8B)
    s = Setup(seq_len=2048, micro_batch=2, adapter="qlora", double_quant=True, checkpointing="offload",
              keep_on_gpu=4, embed_on_cpu=True, mlp_recompute=True, ignored_labels=False,
              offload_strategy="activations")
    gu = 2 * 4096 * 14336 * 2  # gate and up of 4096 tokens, bf16

    def phases(setup):
        a = estimate(sh, setup)["activations"]
        return a["backward_phase_total"], a["loss_phase_total"], a["host_bytes"]

    bwd, loss, host = phases(s)
    for kept, bwd_more in ((1, 0), (2, 1), (4, 3), (9, 3)):  # 4 blocks are kept
        b, lo, h = phases(replace(s, mlp_save_kept=kept))
        assert b - bwd == pytest.approx(bwd_more * gu, rel=1e-6), kept
        assert lo - loss == pytest.approx(min(kept, 4) * gu, rel=1e-6) and h == host
    b, lo, h = phases(replace(s, mlp_save_offloaded=6))
    assert h - host == pytest.approx(6 * gu, rel=1e-6)
    # the copy back now carries gate/up too: the peak moves to where it starts (2 kept stacks + it), from
    # the last block's backward (4 kept stacks)
    stack = 4.5 * 4096 * 4096 * 2
    assert b - bwd == pytest.approx(gu - stack, rel=1e-6) and lo - loss == pytest.approx(gu, rel=1e-6)
    auto = replace(s, mlp_save_offloaded="auto")
    assert peak_bytes(sh, auto) == peak_bytes(sh, replace(s, mlp_save_offloaded=1))
    assert estimate(sh, auto)["activations"]["host_bytes"] == host
    assert peak_bytes(sh, replace(s, offload_strategy="inputs", mlp_save_offloaded=6)) == \
        peak_bytes(sh, replace(s, offload_strategy="inputs"))  # whole blocks recomputed: no effect


def test_activation_offload_backward_peaks_where_the_copy_back_starts():
    """The last offloaded block comes back when the backward of the kept block PREFETCH_LEAD blocks before
    it starts (train/activations.py): with 4 kept blocks the peak is there (2 blocks alive + the copy);
    with one kept block the copy overlaps the last block's backward. Both constants match the runtime's."""
    import tunery.kernels.cross_entropy as ce
    import tunery.train.activations as acts
    from tunery.train.plan import PREFETCH_LEAD, ce_chunk_rows

    assert PREFETCH_LEAD == acts.PREFETCH_LEAD
    for vocab in (32000, 128256, 151936, 262144):
        assert ce_chunk_rows(vocab) == ce._chunk_rows(8192, vocab, None)
    sh = ModelShape.from_hf(LLAMA_8B)
    s = Setup(seq_len=2048, micro_batch=2, adapter="qlora", double_quant=True, checkpointing="offload",
              embed_on_cpu=True, mlp_recompute=True, ignored_labels=False, offload_strategy="activations")
    u = 4096 * 4096 * 2
    stack = 4.5 * u  # x, q, k (1/4), v (1/4), attention output, MLP input

    def bwd(keep, **kw):
        return estimate(sh, replace(s, keep_on_gpu=keep, **kw))["activations"]["backward_phase_total"]

    # one kept block: its backward (its own stack, the copy back beside it) is the offloaded ones' moment
    assert bwd(1) == pytest.approx(bwd(0), rel=1e-9)
    assert bwd(2) - bwd(0) == pytest.approx(stack, rel=1e-6)  # two kept blocks alive + the copy back
    # more kept blocks: the last block's moment (all kept stacks, no copy back yet) takes over
    assert bwd(4) - bwd(0) == pytest.approx(2 * stack, rel=1e-6)
    assert bwd(8) - bwd(0) == pytest.approx(6 * stack, rel=1e-6)
    # offloaded blocks that keep gate/up make the copy back larger: with 4 kept the peak is where it starts
    gu = 7 * u
    assert bwd(4, mlp_save_offloaded="auto") - bwd(0, mlp_save_offloaded="auto") == pytest.approx(stack, rel=1e-6)
    assert bwd(0, mlp_save_offloaded="auto") - bwd(0) == pytest.approx(gu, rel=1e-6)


def test_peak_breakdown_replays_allocator_events():
    """benchmarks/peak_breakdown.py: the live bytes at each phase's highest point, by allocation site
    (synthetic allocator events: two forward tensors, a loss chunk, a backward buffer)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from peak_breakdown import breakdown

    def ev(action, addr, size, file, name="forward"):
        return {"action": action, "addr": addr, "size": size,
                "frames": [{"filename": f"/x/tunery/{file}", "line": 1, "name": name}]}

    mib = 1 << 20
    events = [ev("alloc", 1, 100 * mib, "decoder.py"), ev("alloc", 2, 50 * mib, "lora.py"),
              ev("free_requested", 2, 50 * mib, "lora.py"),
              ev("alloc", 3, 30 * mib, "cross_entropy.py"), ev("free_requested", 3, 30 * mib, "cross_entropy.py"),
              ev("alloc", 4, 70 * mib, "lora.py", "backward"), ev("free_requested", 1, 100 * mib, "decoder.py")]
    lines = breakdown(events, start=1 << 30)
    assert lines[0].startswith("  forward peak 1.146 GiB")  # 1 GiB + 150 MiB
    assert "100.0 MiB" in lines[1] and "decoder.py" in lines[1]
    loss = next(i for i, x in enumerate(lines) if x.startswith("  loss"))
    assert lines[loss].startswith("  loss peak 1.127 GiB")  # 1 GiB + 100 + 30 MiB
    bwd = next(i for i, x in enumerate(lines) if x.startswith("  backward"))
    assert lines[bwd].startswith("  backward peak 1.166 GiB")  # 1 GiB + 100 + 70 MiB


def test_plan_suggests_kept_blocks_that_keep_gate_up():
    """Strategy "activations": when no further block can stay on the GPU but a kept block's gate/up can
    (the last block's cost nothing at the backward peak), the plan says so, with the kept count."""
    from tunery.train.plan import CONTEXT_RESERVE, best_keep_on_gpu, best_save_kept, plan_shapes

    sh = ModelShape.from_hf(LLAMA_8B)
    s = Setup(seq_len=2048, micro_batch=2, adapter="qlora", double_quant=True, checkpointing="offload",
              keep_on_gpu=4, embed_on_cpu=True, mlp_recompute=True, ignored_labels=False,
              offload_strategy="activations", mlp_save_kept=0)
    budget = (peak_bytes(sh, replace(s, mlp_save_kept=1)) + peak_bytes(sh, replace(s, keep_on_gpu=5))) // 2
    assert best_keep_on_gpu(sh, s, budget) == 4 and best_save_kept(sh, s, budget) == 1
    r = plan_shapes(LLAMA_8B, s, budget + CONTEXT_RESERVE)
    assert any(x.startswith("offload_save_mlp_kept: 1 also fits with offload_keep_on_gpu: 4") for x in r.suggestions), \
        r.suggestions
    assert not any(x.startswith("offload_save_mlp_kept") for x in plan_shapes(LLAMA_8B, replace(s, mlp_save_kept=1),
                                                                             budget + CONTEXT_RESERVE).suggestions)


def test_weight_gap_takes_the_dropped_blocks_off_the_peak_moments_until_they_return():
    """offload_weights_mode gap: at the loss all N dropped blocks' 4-bit bytes are off the GPU; in the
    backward each kept block's moment holds the ones gap_returns has brought back by then (the schedule
    the runtime uses), and an offloaded block's moment holds them all. best_weight_gap's pick fits."""
    from tunery.train.plan import best_save_kept, best_weight_gap, gap_returned
    from tunery.train.weight_stream import gap_returns

    sh = ModelShape.from_hf(LLAMA_8B)
    s = Setup(seq_len=2048, micro_batch=2, adapter="qlora", double_quant=True, checkpointing="offload",
              keep_on_gpu=11, mlp_save_kept=10, embed_on_cpu=True, mlp_recompute=True, ignored_labels=False,
              offload_strategy="activations", mlp_save_offloaded="auto")
    block = sh.linear_params() * (0.5 + 1 / 64 + 4 / (64 * 256))

    def phases(setup):
        a = estimate(sh, setup)["activations"]
        return a["loss_phase_total"], a["backward_phase_total"]

    loss0, bwd0 = phases(s)
    for n in (4, 12, 24):
        loss, bwd = phases(replace(s, stream_weights=n, weights_mode="gap"))
        assert loss0 - loss == pytest.approx(n * block, rel=1e-9), n
        assert 0 < bwd0 - bwd <= n * block + 1, n  # some back by the backward's peak moment, not all
        assert phases(replace(s, stream_weights=n))[0] > loss  # "stream" keeps two blocks' in slots
    # the count back at each kept block follows the runtime's schedule
    back = gap_returned(32, 24, 11)
    sched = gap_returns(32, 24, 11)
    assert all(back[j] == sum(len(v) for k, v in sched.items() if k >= j) for j in range(32))
    assert back[31] == 0 and back[24] == 24
    # every dropped block back at the last block's start (more than L - 2 dropped): no saving in backward
    assert phases(replace(s, stream_weights=32, weights_mode="gap"))[1] == pytest.approx(bwd0, rel=1e-9)
    budget = int(7 * 2**30)
    n, keep, saves = best_weight_gap(sh, replace(s, keep_on_gpu=0, mlp_save_kept=0), budget)
    pick = replace(s, stream_weights=n, weights_mode="gap", keep_on_gpu=keep, mlp_save_kept=saves)
    assert peak_bytes(sh, pick) <= budget and max(len(v) for v in gap_returns(32, n, keep).values()) <= 4
    plain = replace(s, keep_on_gpu=7, mlp_save_kept=0)  # memory.py's default pick without it: 7 kept
    assert saves > best_save_kept(sh, plain, budget)
    assert best_weight_gap(sh, replace(s, adapter="lora"), budget) is None
