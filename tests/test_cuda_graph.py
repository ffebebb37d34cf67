"""A training step captured as a CUDA graph trains exactly as the eager step does."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from tunery.adapters import LINEAR_NAMES, inject_lora
from tunery.train.activations import OffloadCheckpoint, apply_checkpointing
from tunery.train.cuda_graph import StepGraph

HF = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)


def _model(device: str):
    from tunery.models.decoder import CausalLM
    from tunery.models.registry import decoder_config

    torch.manual_seed(0)
    m = CausalLM(decoder_config(HF))
    for n, p in m.named_parameters():
        with torch.no_grad():
            p.copy_(torch.ones_like(p) if n.endswith("norm.weight") else torch.randn_like(p) * 0.1)
    inject_lora(m, list(LINEAR_NAMES), 4, 8)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    m = m.to(device)
    if device == "cuda":  # as the trainer runs it: a bf16 base (fused attention), fp32 adapters
        for p in m.parameters():
            p.data = p.data.float() if p.requires_grad else p.data.bfloat16()
    return m


def _batches(n: int, t: int, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, t), generator=g).to(device) for _ in range(n)]


def _setup(base, device: str, offload: bool | str):
    from tunery.models.decoder import doc_boundaries

    m = copy.deepcopy(base)
    m.train()
    fn = None
    if offload == "recompute":  # gradient_checkpointing: true (torch's non-reentrant checkpoint per block)
        apply_checkpointing(m, True, mlp_chunk=None)
    elif offload:
        fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload="activations", keep_on_gpu=1, save_mlp=[0])
        fn.min_bytes = 1024
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, fused=device == "cuda")
    shapes: dict = {}

    def loss_fn(ids):
        b, t = ids.shape
        if t not in shapes:  # two documents per row: attention stays inside each
            pos = torch.cat([torch.arange(t // 3), torch.arange(t - t // 3)]).expand(b, t).to(ids.device)
            shapes[t] = (pos, *doc_boundaries(pos))
        pos, cu, max_len = shapes[t]
        h = m(ids, pos, cu, max_len)
        return F.cross_entropy(m.logits(h)[:, :-1].reshape(-1, HF["vocab_size"]).float(), ids[:, 1:].reshape(-1))

    return m, fn, opt, loss_fn


def _eager_losses(m, opt, loss_fn, batches):
    out = []
    for ids in batches:
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def _adapters(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def test_step_graph_on_cpu_runs_eagerly_and_trains_as_the_plain_loop():
    base = _model("cpu")
    m0, _, opt0, loss0 = _setup(base, "cpu", offload=False)
    m1, _, opt1, loss1 = _setup(base, "cpu", offload=False)
    batches = _batches(4, 24, "cpu")
    ref = _eager_losses(m0, opt0, loss0, batches)
    sg = StepGraph(loss1, opt1, warmup=1)
    got = [sg.step(None, [dict(ids=ids)])[0][0].item() for ids in batches]
    assert got == ref and sg.replays == 0 and sg.eager_steps == 4
    assert sg.why_eager == "the inputs are not all CUDA tensors"
    a, b = _adapters(m0), _adapters(m1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_step_graph_waits_for_what_the_checkpointing_still_decides_on_the_host():
    fn = OffloadCheckpoint(num_layers=4, keep_on_gpu=1, strategy="activations", save_mlp="auto")
    assert "auto" in fn.graph_blocker()
    fn.auto = False
    assert fn.graph_blocker() is None
    fn.last_strategy = "inputs"
    assert "inputs" in fn.graph_blocker()


def test_step_graph_names_what_differs_from_the_captured_step():
    sg = StepGraph(lambda ids: ids.sum(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    sg.static, sg.key = [{"ids": torch.zeros(2, 8, dtype=torch.long)}], 8
    assert sg._mismatch(8, [{"ids": torch.ones(2, 8, dtype=torch.long)}]) is None
    assert "key 9" in sg._mismatch(9, [{"ids": torch.ones(2, 8, dtype=torch.long)}])
    assert "(2, 9)" in sg._mismatch(8, [{"ids": torch.ones(2, 9, dtype=torch.long)}])
    assert "'pos'" in sg._mismatch(8, [{"ids": torch.ones(2, 8, dtype=torch.long), "pos": torch.ones(1)}])
    assert "2 micro-batches" in sg._mismatch(8, [{"ids": torch.ones(2, 8, dtype=torch.long)}] * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True, "recompute"])
def test_gpu_step_graph_trains_as_the_eager_loop(offload):
    """Fused kernels, fused AdamW and (offload) activations through pinned host memory, captured after
    two eager steps: the same losses and adapters as the eager loop, step by step; a batch of another
    length runs eagerly in between and the replays after it still match. (Flash attention's backward
    accumulates with atomics, so the runs agree to rounding, and Adam's steps to a fraction of lr.)"""
    base = _model("cuda")
    m0, fn0, opt0, loss0 = _setup(base, "cuda", offload)
    m1, fn1, opt1, loss1 = _setup(base, "cuda", offload)
    batches = _batches(6, 48, "cuda")
    odd = _batches(1, 36, "cuda", seed=2)[0]
    order = batches[:4] + [odd] + batches[4:]
    ref = _eager_losses(m0, opt0, loss0, order)
    sg = StepGraph(loss1, opt1, checkpoint=fn1, warmup=2)
    got = []
    for ids in order:
        got.append(sg.step(None, [dict(ids=ids)])[0][0].item())
        if ids is odd:
            assert "(2, 36)" in sg.why_eager
    torch.cuda.synchronize()
    assert sg.replays == 4 and sg.eager_steps == 3, (sg.replays, sg.eager_steps, sg.why_eager)
    assert got == pytest.approx(ref, rel=2e-3)
    a, b, start = _adapters(m0), _adapters(m1), _adapters(base)
    moved = sum((a[k] - start[k]).abs().sum().item() for k in a)
    apart = sum((a[k] - b[k]).abs().sum().item() for k in a)
    assert apart < 0.02 * moved, (apart, moved)  # 7 Adam steps of lr 1e-3 moved them; the two runs agree
    if offload is True:
        assert fn1.host_bytes > 0 and not fn1.held


def test_pad_flat_batch_gives_fixed_shapes_that_train_the_same_tokens():
    """Padding is documents of at most max_seqlen tokens with label -100, then zero-length documents; the
    real tokens, labels and positions are untouched; a batch that does not fit is refused."""
    from tunery.data.collate import collate_sft
    from tunery.train.cuda_graph import pad_flat_batch

    rows = [{"input_ids": list(range(1, 8)), "labels": [-100] * 3 + list(range(4, 8))},
            {"input_ids": list(range(10, 15)), "labels": list(range(10, 15))}]
    b = collate_sft(rows)  # 12 tokens, 2 documents
    p = pad_flat_batch(b, tokens=32, docs=6, max_seqlen=8, pad_id=0)
    assert p["input_ids"].shape == (1, 32) and p["labels"].shape == (1, 32) and p["position_ids"].shape == (1, 32)
    assert torch.equal(p["input_ids"][0, :12], b["input_ids"][0]) and torch.equal(p["labels"][0, :12], b["labels"][0])
    assert (p["labels"][0, 12:] == -100).all() and (p["input_ids"][0, 12:] == 0).all()
    assert p["cu_seqlens"].tolist() == [0, 7, 12, 20, 28, 32, 32] and p["max_seqlen"] == 8
    assert p["position_ids"][0, 12:].tolist() == list(range(8)) + list(range(8)) + list(range(4))
    assert pad_flat_batch(b, tokens=32, docs=4, max_seqlen=8) is None  # 2 + 3 padding documents > 4
    assert pad_flat_batch(b, tokens=8, docs=8, max_seqlen=8) is None  # 12 tokens > 8
    full = pad_flat_batch(b, tokens=12, docs=3, max_seqlen=8)
    assert full["cu_seqlens"].tolist() == [0, 7, 12, 12]


def test_config_refuses_cuda_graph_where_it_cannot_capture(tiny_llama):
    from tunery.config import load_config

    base = {"base_model": str(tiny_llama), "datasets": [{"path": "x.jsonl", "type": "alpaca"}], "cuda_graph": True}
    load_config(dict(base, gradient_checkpointing="offload", offload_strategy="activations"))
    for extra, words in ((dict(rl="dpo"), "rl: dpo"),
                         (dict(gradient_checkpointing="offload"), "offload_strategy: activations"),
                         (dict(fsdp=["full_shard"]), "one GPU")):
        with pytest.raises(ValueError, match=words):
            load_config(dict(base, **extra))


def _trainer_losses(tiny_llama, gsm8k_small, tmp_path, name: str, **extra):
    import json

    from tunery.train.loop import train

    cfg = {"base_model": str(tiny_llama), "adapter": "lora", "lora_r": 4, "lora_target_linear": True,
           "datasets": [{"path": str(gsm8k_small), "type": "alpaca", "field_instruction": "question",
                         "field_output": "answer"}],
           "sequence_len": 256, "sample_packing": True, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
           "max_steps": 8, "learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 2, "bf16": True,
           "gradient_checkpointing": "offload", "offload_strategy": "activations", "offload_keep_on_gpu": 1,
           "offload_save_mlp": 0, "output_dir": str(tmp_path / name), "progress_bar": False,
           "dataset_prepared_path": str(tmp_path / "prepared"), **extra}
    run = train(cfg)
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return [r["loss"] for r in rows], [r["lr"] for r in rows]


@pytest.mark.gpu
def test_gpu_trainer_cuda_graph_trains_as_the_eager_trainer(tiny_llama, gsm8k_small, tmp_path, capfd):
    """`cuda_graph: true` through `tunery train` (packing, accumulation, clipping, a cosine schedule,
    offloaded activations): two eager steps, one capture, six replays, and the eager run's losses and
    learning rates. (The padding adds no loss and no gradient: the same numbers, up to rounding.)"""
    eager, lr0 = _trainer_losses(tiny_llama, gsm8k_small, tmp_path, "eager")
    graph, lr1 = _trainer_losses(tiny_llama, gsm8k_small, tmp_path, "graph", cuda_graph=True)
    err = capfd.readouterr().err
    seen = re.search(r"cuda_graph: (\d+) steps replayed, (\d+) eager, (\d+) captured", err)
    # captured again only when a batch holds more documents than the shapes so far
    assert seen and seen.group(1, 2) == ("6", "2") and int(seen.group(3)) >= 1, err[-2000:]
    assert lr1 == pytest.approx(lr0) and len(graph) == 8
    assert graph == pytest.approx(eager, rel=5e-3)


def test_graphed_steps_pad_without_changing_the_loss_or_the_update():
    """GraphedSteps (what `cuda_graph: true` runs) pads each micro-batch to fixed shapes: padding documents
    with label -100 and zero-length documents at the end. On CPU the step runs eagerly through the same
    padded inputs, a device-tensor normaliser and clipping: losses and weights equal the plain loop's."""
    import contextlib

    from tunery.data.collate import collate_sft
    from tunery.methods.sft import SFT
    from tunery.train.cuda_graph import GraphedSteps
    from tunery.train.distributed import clip_grad_norm

    base = _model("cpu")
    g = torch.Generator().manual_seed(3)

    def row(n):
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]}

    steps = [[collate_sft([row(9), row(14)]), collate_sft([row(20)])], [collate_sft([row(5), row(7), row(11)])] * 2]
    m0, _, opt0, _ = _setup(base, "cpu", offload=False)
    m1, _, opt1, _ = _setup(base, "cpu", offload=False)
    p0 = [p for p in m0.parameters() if p.requires_grad]
    p1 = [p for p in m1.parameters() if p.requires_grad]
    sft = SFT()
    gs = GraphedSteps(m1, sft, opt1, p1, to_device=lambda d: d, autocast=contextlib.nullcontext, tokens=32,
                      max_seqlen=24, max_grad_norm=0.5)
    for batches in steps:
        norm = sum(sft.count(b) for b in batches)
        ref = 0.0
        for b in batches:
            loss, _ = sft.loss(m0, b, norm)
            loss.backward()
            ref += loss.item()
        ref_norm = clip_grad_norm(p0, 0.5, as_tensor=True)
        opt0.step()
        opt0.zero_grad(set_to_none=True)
        got, got_norm = gs.step(batches, norm)
        assert got.item() == pytest.approx(ref, rel=1e-5) and got_norm.item() == pytest.approx(ref_norm.item(), rel=1e-4)
    assert gs.docs == 4 and gs.graph.eager_steps == 2
    assert max((a - b).abs().max().item() for a, b in zip(p0, p1)) < 1e-6


def test_trainer_without_a_gpu_says_cuda_graph_is_off_and_trains_eagerly(tiny_llama, gsm8k_small, tmp_path, capfd):
    losses, _ = _trainer_losses(tiny_llama, gsm8k_small, tmp_path, "cpu", cuda_graph=True, max_steps=2, bf16=False)
    assert len(losses) == 2 and all(x == x for x in losses)
    assert "cuda_graph: needs one CUDA GPU; the steps run eagerly" in capfd.readouterr().err


def test_checkpoint_stores_a_tensor_learning_rate_as_a_number(tmp_path):
    """Under cuda_graph the learning rate is a device tensor; the checkpoint keeps a number, so a resumed
    run's capture does not bake in a CPU copy of it (the optimizer itself keeps its tensor)."""
    from tunery.train.checkpoint import save_checkpoint
    from tunery.train.schedule import build_scheduler

    m = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-3), foreach=False)
    sched = build_scheduler(opt, "cosine", 10, 2)
    m(torch.ones(1, 4)).sum().backward()
    opt.step()
    sched.step()
    save_checkpoint(tmp_path / "ck", m, opt, sched, {"step": 1})
    saved = torch.load(tmp_path / "ck" / "optimizer.pt", weights_only=True)
    assert isinstance(saved["param_groups"][0]["lr"], float)
    assert saved["param_groups"][0]["lr"] == pytest.approx(opt.param_groups[0]["lr"].item())
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
