"""Activation checkpointing, CPU offload of the checkpoints and chunked MLPs give the same gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from tunery.adapters import LINEAR_NAMES, inject_lora
from tunery.train.activations import OffloadCheckpoint, apply_checkpointing, chunked_mlp

HF = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)


def _model(dropout: float, device="cpu", dtype=torch.float32):
    from tunery.models.decoder import CausalLM
    from tunery.models.registry import decoder_config

    torch.manual_seed(0)
    m = CausalLM(decoder_config(HF))
    for n, p in m.named_parameters():
        with torch.no_grad():
            p.copy_(torch.ones_like(p) if n.endswith("norm.weight") else torch.randn_like(p) * 0.1)
    inject_lora(m, list(LINEAR_NAMES), 4, 8, dropout=dropout)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return m.to(device=device, dtype=dtype)


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 40), generator=g)
    pos = torch.cat([torch.arange(15), torch.arange(25)]).expand(2, 40).contiguous()  # two documents per row
    return ids.to(device), pos.to(device)


def _grads(base, mode, chunk=None, twice=False):
    m = copy.deepcopy(base)
    m.train()
    apply_checkpointing(m, mode, mlp_chunk=chunk)
    ids, pos = _batch(next(m.parameters()).device)
    torch.manual_seed(7)
    loss = 0
    for _ in range(2 if twice else 1):  # two forwards before one backward (accumulation in one graph)
        h = m(ids, pos)
        loss = loss + (h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def _max_diff(a, b):
    assert a.keys() == b.keys() and len(a) == 7 * 2 * HF["num_hidden_layers"]
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_checkpoint_and_offload_equal_plain_with_dropout():
    """Recomputation replays the RNG: with LoRA dropout the gradients are bit-identical."""
    base = _model(dropout=0.1)
    loss0, g0 = _grads(base, False)
    for mode in (True, "offload"):
        loss, g = _grads(base, mode)
        assert torch.equal(loss, loss0)
        assert _max_diff(g, g0) == 0.0, mode


def test_first_block_adapters_get_gradients():
    """The embeddings are frozen, so block 0's input needs no grad; its LoRA weights still train."""
    base = _model(dropout=0.0)
    _, g = _grads(base, "offload")
    assert g["model.layers.0.self_attn.q_proj.lora_B"].abs().sum() > 0


def test_two_forwards_then_backward():
    base = _model(dropout=0.0)
    _, g0 = _grads(base, False, twice=True)
    _, g1 = _grads(base, "offload", twice=True)
    assert _max_diff(g1, g0) < 1e-6


@pytest.mark.parametrize("mode", [False, True, "offload"])
def test_chunked_mlp_same_gradients(mode):
    base = _model(dropout=0.0)
    loss0, g0 = _grads(base, False)
    loss, g = _grads(base, mode, chunk=16)  # 80 tokens -> 5 chunks
    assert torch.allclose(loss, loss0, atol=1e-6)
    assert _max_diff(g, g0) < 1e-5


def test_chunked_mlp_function_and_no_grad():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(8, 20), torch.nn.Linear(20, 8)

    def dense(t):
        return lin2(torch.nn.functional.silu(lin1(t)))

    x = torch.randn(3, 11, 8, requires_grad=True)
    y = chunked_mlp(dense, x, 4)
    assert y.shape == (3, 11, 8)
    y.pow(2).sum().backward()
    gx, gw = x.grad.clone(), lin1.weight.grad.clone()
    x.grad = None
    lin1.weight.grad = None
    dense(x).pow(2).sum().backward()
    assert torch.allclose(gx, x.grad, atol=1e-6) and torch.allclose(gw, lin1.weight.grad, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(chunked_mlp(dense, x, 4), dense(x), atol=1e-6)


def test_no_grad_forward_in_train_mode_and_switching_off():
    m = _model(dropout=0.0)
    m.train()
    ids, pos = _batch()
    with torch.no_grad():
        ref = m(ids, pos)
    fn = apply_checkpointing(m, "offload", mlp_chunk=16)
    assert isinstance(fn, OffloadCheckpoint)
    with torch.no_grad():  # e.g. a reference-model pass: no recomputation machinery
        assert torch.allclose(m(ids, pos), ref, atol=1e-6)
    apply_checkpointing(m, False)
    assert m.model.checkpoint_fn is None and "forward" not in m.model.layers[0].mlp.__dict__
    with pytest.raises(ValueError):
        apply_checkpointing(m, "sometimes")


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("strategy", ["inputs", "activations"])
def test_gpu_offload_gradients(chunk, strategy):
    """On CUDA the tensors really go through pinned host memory; gradients equal plain training."""
    base = _model(dropout=0.0, device="cuda")
    _, g0 = _grads(base, False)
    m = copy.deepcopy(base)
    m.train()
    fn = apply_checkpointing(m, "offload", mlp_chunk=chunk, offload=strategy)
    fn.min_bytes = 1024
    ids, pos = _batch("cuda")
    for _ in range(2):  # the second step reuses the pinned buffers
        m.zero_grad(set_to_none=True)
        h = m(ids, pos)
        ((h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()).backward()
    g = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert _max_diff(g, g0) < 1e-4 and fn.host_bytes > 0


@pytest.mark.gpu
def test_gpu_offload_lowers_peak_memory():
    from tunery.models.decoder import CausalLM
    from tunery.models.registry import decoder_config

    hf = dict(HF, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4)
    torch.manual_seed(0)
    base = CausalLM(decoder_config(hf)).to("cuda", torch.bfloat16)
    inject_lora(base, list(LINEAR_NAMES), 8, 16)
    ids = torch.randint(0, 128, (1, 16384), device="cuda")
    peaks = {}
    for mode, chunk, strategy in ((True, None, "inputs"), ("offload", None, "inputs"), ("offload", 2048, "inputs"),
                                  ("offload", None, "activations"), (False, None, "inputs")):
        fn = apply_checkpointing(base, mode, mlp_chunk=chunk, offload=strategy)
        base.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        h = base(ids)
        h.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        peaks[(mode, chunk, strategy)] = torch.cuda.max_memory_allocated() - start
        base.zero_grad(set_to_none=True)
        if mode == "offload":
            assert fn.host_bytes >= 7 * 16384 * 1024 * 2
    u = 16384 * 1024 * 2
    print({k: round(v / u, 1) for k, v in peaks.items()}, "(units of one hidden-state tensor)")
    assert peaks[("offload", None, "inputs")] < peaks[(True, None, "inputs")] - 4 * u  # 8 inputs -> ~2 on the GPU
    assert peaks[("offload", 2048, "inputs")] < peaks[("offload", None, "inputs")]
    assert peaks[("offload", None, "activations")] < peaks[(False, None, "inputs")] - 8 * u


def test_fused_block_path_with_nf4_offload_and_chunks(monkeypatch):
    """The decoder's fused path (fused norm+LoRA, fused MLP; plain-PyTorch rows on CPU) over NF4
    weights: offload and MLP chunks (wrapping forward_fused) give the plain gradients."""
    import tunery.kernels.lora as kl
    import tunery.models.decoder as dec
    from tunery.quant import quantize_model

    base = _model(dropout=0.0)
    quantize_model(base)
    monkeypatch.setattr(dec, "use_triton_for", lambda x, *a, **k: True)  # take Block._forward_fused on CPU
    calls = []
    orig = kl.FusedMLPFunction.apply
    monkeypatch.setattr(kl.FusedMLPFunction, "apply", lambda *a: calls.append(1) or orig(*a))
    _, g0 = _grads(base, False)
    assert calls, "the fused MLP path was not taken"
    for mode in (True, "offload"):
        _, g = _grads(base, mode, chunk=16)
        assert _max_diff(g, g0) < 1e-5, mode


@pytest.mark.parametrize("dropout, chunk", [(0.1, None), (0.0, 16)])
def test_activation_offload_strategy_equals_plain(dropout, chunk):
    """Strategy "activations" (every large saved tensor to host memory, no recomputation), simulated
    on CPU with plain copies: the same gradients as plain training, bit for bit without chunks."""
    base = _model(dropout=dropout)
    _, g0 = _grads(base, False, chunk=chunk)
    m = copy.deepcopy(base)
    m.train()
    fn = apply_checkpointing(m, "offload", mlp_chunk=chunk, offload="activations")
    fn.simulate, fn.min_bytes = True, 1024  # copy even the tiny tensors of this model
    ids, pos = _batch()
    torch.manual_seed(7)
    h = m(ids, pos)
    loss = (h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()
    loss.backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert fn.last_strategy == "activations"
    if chunk is None:
        assert _max_diff(g, g0) == 0.0
    else:
        assert _max_diff(g, g0) < 1e-5


def test_pinned_pool_reuses_the_smallest_free_buffer_that_fits():
    """Free buffers of different sizes are told apart by identity (a list.remove of tensors compares
    them elementwise and fails when their sizes differ, as it did on the GPU)."""
    from tunery.train.activations import PinnedPool

    pool = PinnedPool()
    big, small, tiny = (torch.empty(n, dtype=torch.uint8) for n in (4096, 1024, 16))
    for b in (big, small, tiny):
        pool.put(b)
    assert pool.get(1000) is small
    assert pool.get(2000) is big
    assert len(pool.free) == 1 and pool.free[0] is tiny


def test_activation_group_keeps_one_copy_of_a_tensor_saved_under_two_shapes():
    """The attention output is saved as [N, H, D] by attention and as [N, H * D] by o_proj: one host
    copy, and each unpack gets its own shape back with the values as they were at the end of the block."""
    from tunery.train.activations import OffloadCheckpoint, _ActGroup

    owner = OffloadCheckpoint(strategy="activations", min_bytes=16, simulate=True)
    g = _ActGroup(owner, set(), simulate=True)
    t = torch.randn(6, 4, 8)
    a = g.pack(t)
    b = g.pack(t.view(6, 32))
    c = g.pack(t[:, :2])  # a gapped view: stays as it is
    g.close()
    assert g.bytes == t.numel() * t.element_size() and len(g.items) == 1
    assert c is not None and isinstance(c, torch.Tensor)
    ua, ub = _ActGroup.unpack(a), _ActGroup.unpack(b)
    assert ua.shape == (6, 4, 8) and ub.shape == (6, 32)
    torch.testing.assert_close(ua, t)
    torch.testing.assert_close(ub, t.view(6, 32))


def test_activation_strategy_recomputes_gate_up_in_the_fused_mlp(monkeypatch):
    """Strategy "activations" (simulated on CPU) runs each block's fused MLP with gate/up recompute
    on (their [tokens, intermediate] tensors are not offloaded), puts the switch back afterwards, and
    gives the plain gradients over NF4 weights."""
    import tunery.kernels as kernels
    import tunery.kernels.lora as kl
    import tunery.models.decoder as dec
    from tunery.quant import quantize_model

    base = _model(dropout=0.0)
    quantize_model(base)
    monkeypatch.setattr(dec, "use_triton_for", lambda x, *a, **k: True)  # take Block._forward_fused on CPU
    seen = []
    orig = kl.FusedMLPFunction.apply
    monkeypatch.setattr(kl.FusedMLPFunction, "apply", lambda *a: seen.append(a[2].recompute) or orig(*a))
    _, g0 = _grads(base, False)
    assert seen and not any(seen)
    seen.clear()
    m = copy.deepcopy(base)
    m.train()
    fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload="activations")
    fn.simulate, fn.min_bytes = True, 1024
    ids, pos = _batch()
    casts = []
    orig_cast = kernels._cast
    monkeypatch.setattr(kernels, "_cast", lambda *a: casts.append(1) or orig_cast(*a))
    torch.manual_seed(7)
    h = m(ids, pos)
    loss = (h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()
    n_forward = len(casts)
    loss.backward()
    assert seen and all(seen), seen
    # the scaled adapter copies made in forward serve the backward too, although the saved-tensor
    # hooks hand back new tensor objects (the parameters do not go through them)
    assert n_forward > 0 and len(casts) == n_forward
    assert not any(layer.mlp.recompute for layer in m.model.layers)
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert _max_diff(g, g0) < 1e-5


def test_trainer_passes_the_offload_settings(tiny_llama, gsm8k_small, tmp_path, monkeypatch):
    """`gradient_checkpointing: offload` with `offload_strategy` / `offload_keep_on_gpu` in the config
    reaches the checkpoint function the trainer installs, and the run trains (on CPU the offload falls
    back to plain recomputation); the long-lived objects are frozen out of the garbage collector."""
    import gc
    import json as _json

    import tunery.train.activations as acts
    from tunery.train.loop import train

    seen = []
    orig = acts.apply_checkpointing
    monkeypatch.setattr(acts, "apply_checkpointing", lambda m, mode, **kw: seen.append((mode, kw)) or orig(m, mode, **kw))
    frozen = []  # the trainer moves the long-lived objects out of the collector's view before the loop
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(1))
    monkeypatch.setattr(gc, "unfreeze", lambda: frozen.append(0))  # and back at the end
    cfg = {"base_model": str(tiny_llama), "adapter": "lora", "lora_r": 4, "lora_target_linear": True,
           "datasets": [{"path": str(gsm8k_small), "type": "alpaca", "field_instruction": "question",
                         "field_output": "answer"}],
           "sequence_len": 256, "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
           "gradient_checkpointing": "offload", "offload_strategy": "activations", "offload_keep_on_gpu": 1,
           "output_dir": str(tmp_path / "run"), "progress_bar": False,
           "dataset_prepared_path": str(tmp_path / "prepared")}
    run = train(cfg)
    assert seen == [("offload", {"offload": "activations", "keep_on_gpu": 1, "save_mlp": "auto",
                                 "save_mlp_kept": 1, "stream_weights": 0, "weights_mode": "stream"})]
    assert frozen == [1, 0]
    steps = [r for r in map(_json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]


@pytest.mark.parametrize("lead", [1, 2])
def test_kept_blocks_start_the_copy_back_of_the_last_offloaded_block(monkeypatch, lead):
    """Strategy "activations" with offload_keep_on_gpu: the last offloaded block's tensors are not copied
    back at the end of forward (they would sit on the GPU through the loss and the kept blocks'
    backward, the step's peak) but when the backward of the kept block PREFETCH_LEAD blocks before it
    begins; and the gradients are the plain ones."""
    import tunery.train.activations as act

    monkeypatch.setattr(act, "PREFETCH_LEAD", lead)
    base = _model(dropout=0.0)
    _, g0 = _grads(base, False)
    m = copy.deepcopy(base)
    m.train()
    n = len(m.model.layers)
    fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload="activations", keep_on_gpu=2)
    fn.simulate, fn.min_bytes = True, 1024
    order: list = []
    for i, layer in enumerate(m.model.layers):
        layer.self_attn.q_proj.lora_A.register_hook(lambda g, i=i: order.append(i))
    real = act._ActGroup.prefetch

    def prefetch(self):
        if self.gpu is None:
            order.append("prefetch")
        real(self)

    monkeypatch.setattr(act._ActGroup, "prefetch", prefetch)
    ids, pos = _batch()
    torch.manual_seed(7)
    h = m(ids, pos)
    last = fn._last_group()
    assert last is not None and last.gpu is None and order == []  # nothing comes back during forward
    loss = (h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()
    loss.backward()
    # blocks n-1, n-2 are kept; block n-3 (offloaded) comes back `lead` kept blocks before its backward
    assert order == [n - 1, "prefetch", n - 2, n - 3] if lead == 1 else ["prefetch", n - 1, n - 2, n - 3]
    g = {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}
    assert _max_diff(g, g0) == 0.0


def test_blocks_in_save_mlp_keep_gate_up_and_the_gradients_stay_plain(monkeypatch):
    """Strategy "activations" with save_mlp: the chosen blocks (one offloaded, one kept on the GPU) run
    their fused MLP without the gate/up recompute and every other block with it; the switches are put
    back; gradients equal plain training over NF4 weights (simulated offload on CPU)."""
    import tunery.kernels.lora as kl
    import tunery.models.decoder as dec
    from tunery.quant import quantize_model
    from tunery.train.activations import save_mlp_layers

    base = _model(dropout=0.0)
    quantize_model(base)
    n = len(base.model.layers)
    monkeypatch.setattr(dec, "use_triton_for", lambda x, *a, **k: True)  # take Block._forward_fused on CPU
    _, g0 = _grads(base, False)
    m = copy.deepcopy(base)
    m.train()
    save = save_mlp_layers(n, 1, kept=1, offloaded=1)
    assert save == [n - 2, n - 1]
    fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload="activations", keep_on_gpu=1, save_mlp=save)
    fn.simulate, fn.min_bytes = True, 1024
    seen = []
    orig = kl.FusedMLPFunction.apply
    monkeypatch.setattr(kl.FusedMLPFunction, "apply", lambda *a: seen.append(a[2].recompute) or orig(*a))
    saved_bytes = []
    orig_close = fn._activations

    def spy(*a):
        y = orig_close(*a)
        saved_bytes.append(fn._last_group().bytes)
        return y

    monkeypatch.setattr(fn, "_activations", spy)
    ids, pos = _batch()
    torch.manual_seed(7)
    h = m(ids, pos)
    loss = (h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()
    loss.backward()
    assert seen == [i not in save for i in range(n)]
    assert not any(layer.mlp.recompute for layer in m.model.layers)
    # the offloaded block that keeps gate/up sends them to host memory too: 2 x [tokens, intermediate] more
    inter = m.model.layers[0].mlp.gate_proj.out_features
    tokens = ids.numel()
    assert saved_bytes[-1] - saved_bytes[0] == 2 * tokens * inter * 4, saved_bytes
    g = {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}
    assert _max_diff(g, g0) < 1e-5


def test_save_mlp_layers_spreads_the_offloaded_choice():
    from tunery.train.activations import save_mlp_layers

    # kept: the last ones (the very last block's gate/up cost nothing at the backward peak)
    assert save_mlp_layers(32, 4, kept=2, offloaded=5) == [5, 11, 16, 22, 27, 30, 31]
    assert save_mlp_layers(32, 4, kept=9, offloaded=99) == list(range(32))
    assert save_mlp_layers(8, 0) == []
    assert save_mlp_layers(8, 2, offloaded=1) == [5]


def test_gate_up_blocks_that_fit_uses_the_copy_time_the_forward_leaves():
    """Llama-8B at 2 x 2048 on an H200 (session 6 measurements): a 116 ms forward copies 4.03 GB out in
    73 ms (55 GB/s); 90% of 116 ms carries 5.76 GB, 1.73 GB more: seven blocks' gate/up of 235 MB."""
    from tunery.train.activations import gate_up_blocks_that_fit

    gu = 2 * 4096 * 14336 * 2
    assert gate_up_blocks_that_fit(116.0, 73.3, 4_030_000_000, gu, 28) == 7
    assert gate_up_blocks_that_fit(116.0, 110.0, 4_030_000_000, gu, 28) == 0  # copies already fill the forward
    assert gate_up_blocks_that_fit(1000.0, 10.0, 4_030_000_000, gu, 28) == 28  # capped at the offloaded blocks
    assert gate_up_blocks_that_fit(116.0, 0.0, 0, gu, 28) == 0


@pytest.mark.gpu
def test_gpu_save_mlp_auto_times_three_forwards_then_keeps_gate_up():
    """save_mlp "auto" on CUDA: no choice before the fifth forward (the second to fourth are timed with
    CUDA events), then a count within the offloaded blocks; the fused MLPs of the chosen blocks stop
    recomputing gate/up, their copies out grow by them, and the gradients stay the plain ones."""
    import tunery.kernels.lora as kl

    base = _model(dropout=0.0, device="cuda")
    _, g0 = _grads(base, False)
    m = copy.deepcopy(base)
    m.train()
    fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload="activations", save_mlp="auto")
    fn.min_bytes = 1024
    ids, pos = _batch("cuda")
    seen = []
    orig = kl.FusedMLPFunction.apply

    def spy(*a):
        seen.append(a[2].recompute)
        return orig(*a)

    kl.FusedMLPFunction.apply = spy
    try:
        for step in range(5):
            seen.clear()
            m.zero_grad(set_to_none=True)
            torch.manual_seed(7)
            h = m(ids, pos)
            ((h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()).backward()
            torch.cuda.synchronize()
            if step < 4:
                assert fn.auto_report is None and not fn.save_mlp and all(seen), (step, seen)
    finally:
        kl.FusedMLPFunction.apply = orig
    rep = fn.auto_report
    n = HF["num_hidden_layers"]
    assert rep is not None and 0 <= rep["save_mlp_blocks"] <= n and rep["forward_ms"] > 0 and rep["copy_gbps"] > 0
    assert seen == [i not in fn.save_mlp for i in range(n)] and len(fn.save_mlp) == rep["save_mlp_blocks"]
    g = {k: p.grad for k, p in m.named_parameters() if p.requires_grad}
    assert _max_diff(g, g0) < 1e-4


def test_trainer_turns_a_save_mlp_count_into_offloaded_blocks():
    """`offload_save_mlp: N` (a count) reaches the checkpoint function as the indices save_mlp_layers
    spreads over the offloaded blocks; "auto" goes through as it is; `offload_save_mlp_kept: N` adds the
    last N kept blocks either way (known before any forward)."""
    from tunery.train.loop import _apply_checkpointing

    m = _model(dropout=0.0)
    n = len(m.model.layers)
    _apply_checkpointing(m, "offload", offload="activations", keep_on_gpu=1, save_mlp=1)
    assert m.model.checkpoint_fn.save_mlp == {n - 2} and not m.model.checkpoint_fn.auto
    _apply_checkpointing(m, "offload", offload="activations", keep_on_gpu=1, save_mlp="auto")
    assert m.model.checkpoint_fn.auto and not m.model.checkpoint_fn.save_mlp
    _apply_checkpointing(m, "offload", offload="activations", keep_on_gpu=2, save_mlp="auto", save_mlp_kept=1)
    assert m.model.checkpoint_fn.auto and m.model.checkpoint_fn.save_mlp == {n - 1}
    _apply_checkpointing(m, "offload", offload="activations", keep_on_gpu=2, save_mlp=1, save_mlp_kept=5)
    assert m.model.checkpoint_fn.save_mlp == {n - 3, n - 2, n - 1}


def test_config_offload_save_mlp_kept_reaches_the_checkpoint_function_and_the_planner(tiny_llama):
    """The config key (default 1) goes to apply_checkpointing and to the planner's Setup."""
    from tunery.config import load_config
    from tunery.train.plan import setup_from_config

    base = {"base_model": str(tiny_llama), "adapter": "lora", "gradient_checkpointing": "offload",
            "offload_strategy": "activations", "offload_keep_on_gpu": 2,
            "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    assert load_config(base).offload_save_mlp_kept == 1
    assert setup_from_config(load_config({**base, "offload_save_mlp_kept": 2})).mlp_save_kept == 2
    with pytest.raises(Exception, match="offload_save_mlp_kept"):
        load_config({**base, "offload_save_mlp_kept": -1})


def test_activation_group_keeps_one_copy_of_a_transposed_view_and_its_flat_view():
    """cuDNN attention saves its output as [B, H, T, D], a transposed view of [B, T, H, D] memory, and
    o_proj saves the same memory as [N, H * D]: one host copy, both views come back exact."""
    from tunery.train.activations import OffloadCheckpoint, _ActGroup

    owner = OffloadCheckpoint(strategy="activations", min_bytes=16, simulate=True)
    g = _ActGroup(owner, set(), simulate=True)
    mem = torch.randn(2, 5, 4, 8)  # B, T, H, D
    a = g.pack(mem.transpose(1, 2))  # dense, not contiguous
    b = g.pack(mem.view(10, 32))
    g.close()
    assert g.bytes == mem.numel() * mem.element_size() and len(g.items) == 1
    ua, ub = _ActGroup.unpack(a), _ActGroup.unpack(b)
    assert ua.shape == (2, 4, 5, 8) and ub.shape == (10, 32)
    assert torch.equal(ua, mem.transpose(1, 2)) and torch.equal(ub, mem.view(10, 32))


def test_save_mlp_auto_retimes_a_forward_that_never_finished(monkeypatch):
    """A timed forward that raised (no end event) is dropped: the next forward is timed instead, so the
    choice is still made and the copies of later forwards are not timed forever. CUDA events are faked."""
    from tunery.train.activations import OffloadCheckpoint

    class FakeEvent:
        def query(self):
            return True

        def elapsed_time(self, other):
            return 10.0

    import tunery.train.activations as acts

    monkeypatch.setattr(acts._Calibration, "event", staticmethod(lambda stream: FakeEvent()))
    monkeypatch.setattr(acts.torch.cuda, "current_stream", lambda *a: None)
    fn = OffloadCheckpoint(num_layers=2, strategy="activations", save_mlp="auto")
    layer = _model(dropout=0.0).model.layers[0]
    x = torch.zeros(1, 8, 64)
    fn._calibrate(layer, x, 0)  # forward 1: not timed
    assert fn._cal is None
    fn._calibrate(layer, x, 0)  # forward 2: timed, but it raises before its last block
    first = fn._cal
    assert first is not None and first.end is None
    fn._calibrate(layer, x, 0)  # forward 3: times itself instead
    assert fn._cal is not None and fn._cal is not first and fn.auto
    for timed in (1, 2):  # forwards 4 and 5: the one before is in; this one is timed next
        fn._cal.end = FakeEvent()
        fn._calibrate(layer, x, 0)
        assert fn.auto and fn._cal is not None and len(fn._timed) == timed
    fn._cal.end = FakeEvent()
    fn._calibrate(layer, x, 0)  # forward 6: decides (no copies timed: nothing to add)
    assert not fn.auto and fn._cal is None and fn.auto_report["save_mlp_blocks"] == 0
    assert fn.auto_report["forwards_ms"] == [10.0, 10.0, 10.0]


def test_save_mlp_auto_decides_on_the_shorter_timed_forward(monkeypatch):
    """Three timed forwards (fake CUDA events): the shortest one, and its copies, pick the count; a
    forward whose events are not done yet is looked at again at the next forward."""
    import tunery.train.activations as acts
    from tunery.train.activations import OffloadCheckpoint, gate_up_blocks_that_fit

    class Ev:
        def __init__(self, t=0.0, done=True):
            self.t, self.done = t, done

        def query(self):
            return self.done

        def elapsed_time(self, other):
            return other.t - self.t

    monkeypatch.setattr(acts.torch.cuda, "current_stream", lambda *a: None)
    monkeypatch.setattr(acts._Calibration, "event", staticmethod(lambda stream: Ev()))
    monkeypatch.setattr(acts, "_host_free", lambda: 1 << 50)
    fn = OffloadCheckpoint(num_layers=32, keep_on_gpu=4, strategy="activations", save_mlp="auto", save_kept=1)
    assert fn.save_mlp == {31}  # the kept block's choice is known at once
    layer = _model(dropout=0.0).model.layers[0]
    x = torch.zeros(1, 4096, 64)  # gate/up: 2 x 4096 x 160 x 4 bytes
    gu = 2 * 4096 * 160 * 4
    fn._calibrate(layer, x, 0)  # forward 1
    for forward_ms, copy_ms in ((150.0, 60.0), (100.0, 60.0), (200.0, 60.0)):
        fn._calibrate(layer, x, 0)
        cal = fn._cal
        cal.start, cal.end = Ev(0.0), Ev(forward_ms, done=False)
        cal.copies, cal.bytes = [(Ev(0.0), Ev(copy_ms))], 10 * gu
        fn._calibrate(layer, x, 0)  # events not done: nothing happens
        assert fn._cal is cal and fn.auto
        cal.end.done = True
    fn._calibrate(layer, x, 0)
    n = gate_up_blocks_that_fit(100.0, 60.0, 10 * gu, gu, 28)
    assert not fn.auto and n == 5 and gate_up_blocks_that_fit(150.0, 60.0, 10 * gu, gu, 28) == 12 and fn.auto_report["save_mlp_blocks"] == n
    assert fn.auto_report["forwards_ms"] == [150.0, 100.0, 200.0] and fn.auto_report["forward_ms"] == 100.0
    assert fn.save_mlp == set(acts.save_mlp_layers(32, 4, 1, n)) and 31 in fn.save_mlp


def test_calibration_counts_the_median_block_not_a_stalled_one():
    """The timed forward is the median block's time x the blocks: a few blocks where the GPU waited on the
    host (one 60 ms stall here) do not make the forward look long enough to carry more gate/up copies;
    a forward whose blocks are all slow keeps its span."""
    from tunery.train.activations import _Calibration

    class Ev:
        def __init__(self, t):
            self.t = t

        def elapsed_time(self, other):
            return other.t - self.t

    def timed(block_ms):
        cal = _Calibration()
        t = [0.0]
        for ms in block_ms:
            t.append(t[-1] + ms)
        cal.start, cal.blocks, cal.end = Ev(t[0]), [Ev(v) for v in t[1:-1]], Ev(t[-1])
        cal.copies, cal.bytes = [(Ev(0.0), Ev(50.0))], 1000
        return cal.result()

    forward, copy_ms, copied, span = timed([3.0] * 30 + [60.0, 3.0])
    assert span == 153.0 and forward == 96.0 and copy_ms == 50.0 and copied == 1000
    forward, _, _, span = timed([3.0, 1.0, 3.0, 3.0])  # shorter than the median x blocks: the span
    assert forward == span == 10.0
