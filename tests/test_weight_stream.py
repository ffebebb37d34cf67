"""Frozen 4-bit weights streamed from host memory (train/weight_stream.py), simulated on CPU: the
gradients are the plain ones, every dequantization sees the block's weights in place, at most two
streamed blocks are in at a time, evaluation works, and detach() puts everything back."""

import copy

import pytest
import torch

from test_offload import HF, _batch, _max_diff, _model
from tunery.train.activations import apply_checkpointing
from tunery.train.weight_stream import WeightLend, first_blocks, quantized_buffers


def _qmodel():
    from tunery.quant import quantize_model

    m = _model(dropout=0.0)
    quantize_model(m)
    return m


def _reference_and_copy():
    """The plain gradients of a fresh 4-bit model, and a copy of it in train mode to set up."""
    base = _qmodel()
    m0 = copy.deepcopy(base)
    m0.train()
    g0 = _run(m0)
    m = copy.deepcopy(base)
    m.train()
    return base, g0, m


def _run(m, spy=None, after_forward=None):
    ids, pos = _batch()
    torch.manual_seed(7)
    h = m(ids, pos)
    if after_forward is not None:
        after_forward()
    if spy is not None:
        spy.append("backward")
    ((h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()).backward()
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}


def test_first_blocks_are_the_early_offloaded_ones():
    assert first_blocks(32, 4, 10) == list(range(10))
    assert first_blocks(32, 4, 99) == list(range(28))
    assert first_blocks(3, 0, 0) == []


@pytest.mark.parametrize("strategy", ["activations", "inputs"])
def test_streamed_weights_train_like_resident_ones(monkeypatch, strategy):
    import tunery.quant.nf4 as nf4

    _, g0, m = _reference_and_copy()
    n = len(m.model.layers)
    fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload=strategy, keep_on_gpu=1, stream_weights=2)
    fn.simulate, fn.min_bytes = True, 1024
    ws = fn.weights
    assert sorted(ws.blocks) == [0, 1] and n == HF["num_hidden_layers"]
    owner = {id(mod): i for i in ws.blocks for mod, _ in quantized_buffers(m.model.layers[i])}
    events, peak = [], [0]
    real = nf4.NF4Weight.dequantize

    def dequantize(self, *a, **k):
        i = owner.get(id(self))
        if i is not None:  # a streamed block's weight: its buffers are the device copies, not the host ones
            hosts = {id(h) for mod, _, h, _ in ws.items[i] if mod is self}
            assert id(self.packed) not in hosts and i in ws.resident, (i, events)
            events.append(i)
        peak[0] = max(peak[0], len(ws.resident))
        return real(self, *a, **k)

    monkeypatch.setattr(nf4.NF4Weight, "dequantize", dequantize)
    between = []
    g = _run(m, spy=events, after_forward=lambda: between.append(sorted(ws.resident)))
    assert between == [[]]  # every streamed block's weights left after its forward
    assert _max_diff(g, g0) < 1e-5
    fwd, bwd = events[: events.index("backward")], events[events.index("backward") + 1:]
    assert set(fwd) == {0, 1} and set(bwd) == {0, 1} and bwd.index(1) < bwd.index(0)  # backward runs 1, then 0
    assert peak[0] <= 2 and sorted(ws.resident) == [0]  # block 0 stays in for the next forward
    # the module buffers of block 1 point at host copies between uses; its weights took the host bytes
    assert all(getattr(mod, name) is h for mod, name, h, _ in ws.items[1]) and ws.host_bytes > 0
    # a second step: same gradients (the stream state carries over)
    m.zero_grad(set_to_none=True)
    events.clear()
    assert _max_diff(_run(m, spy=events), g0) < 1e-5


def test_evaluation_and_detach(monkeypatch):
    base = _qmodel()
    m = copy.deepcopy(base)
    m.train()
    fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload="activations", stream_weights=3)
    fn.simulate, fn.min_bytes = True, 1024
    ws = fn.weights
    _run(m)
    ids, pos = _batch()
    m.eval()
    with torch.no_grad():  # not through the checkpoint function: the blocks' own hooks bring weights in
        out = m(ids, pos)
        ref = copy.deepcopy(base).eval()(ids, pos)
    assert torch.allclose(out, ref, atol=1e-5) and not ws.resident
    # a new checkpoint setup detaches the old stream: hooks off, the device copies back in the modules
    apply_checkpointing(m, "offload", mlp_chunk=None, offload="activations")
    assert not ws.handles and not ws.items and m.model.checkpoint_fn.weights is None
    with torch.no_grad():
        assert torch.allclose(m(ids, pos), ref, atol=1e-5)
    with pytest.raises(ValueError, match="offload"):
        apply_checkpointing(m, True, stream_weights=2)


def test_planner_counts_streamed_weights_in_cpu_memory():
    """offload_weights: N: N blocks' NF4 bytes leave the GPU estimate but two blocks' (in use, next)."""
    from dataclasses import replace

    from test_plan import LLAMA_8B
    from tunery.train.plan import ModelShape, Setup, estimate

    sh = ModelShape.from_hf(LLAMA_8B)
    s = Setup(seq_len=2048, micro_batch=2, adapter="qlora", double_quant=True, checkpointing="offload",
              keep_on_gpu=4, embed_on_cpu=True, mlp_recompute=True, offload_strategy="activations")
    per_block = sh.linear_params() * (0.5 + 1 / 64 + 4 / (64 * 256))
    w0 = estimate(sh, s)["weights"]
    w = estimate(sh, replace(s, stream_weights=10))["weights"]
    assert w0["bytes"] - w["bytes"] == pytest.approx(8 * per_block) == w["linears_in_cpu_memory"]
    # at most the offloaded blocks (32 - 4 kept), nothing without offload
    assert estimate(sh, replace(s, stream_weights=99))["weights"]["linears_in_cpu_memory"] == pytest.approx(26 * per_block)
    assert estimate(sh, replace(s, stream_weights=10, checkpointing=True))["weights"]["bytes"] == \
        estimate(sh, replace(s, checkpointing=True))["weights"]["bytes"]


def test_config_offload_weights_needs_4bit_offload_and_one_gpu(tiny_llama):
    from tunery.config import load_config
    from tunery.train.plan import setup_from_config

    base = {"base_model": str(tiny_llama), "adapter": "qlora", "load_in_4bit": True, "gradient_checkpointing": "offload",
            "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    assert setup_from_config(load_config({**base, "offload_weights": 3})).stream_weights == 3
    gap = setup_from_config(load_config({**base, "offload_weights": 3, "offload_weights_mode": "gap"}))
    assert (gap.stream_weights, gap.weights_mode) == (3, "gap")
    load_config({**base, "offload_weights": 3, "offload_weights_mode": "gap", "rl": "grpo"})  # rollouts bring them back
    with pytest.raises(Exception, match="offload_weights_mode"):
        load_config({**base, "offload_weights": 3, "offload_weights_mode": "slots"})
    for bad in ({"gradient_checkpointing": True}, {"adapter": "lora", "load_in_4bit": False},
                {"fsdp": ["full_shard", "auto_wrap"]}):
        with pytest.raises(Exception, match="offload_weights"):
            load_config({**base, **bad, "offload_weights": 3})
    assert load_config({**base, "gradient_checkpointing": True}).offload_weights == 0
    with pytest.raises(Exception, match="offload_weights_mode: gap .* set offload_weights: N"):  # would do nothing
        load_config({**base, "offload_weights_mode": "gap"})
    lend = {**base, "offload_weights": 32, "offload_weights_mode": "lend", "offload_strategy": "activations"}
    assert setup_from_config(load_config({**lend, "cuda_graph": True})).weights_mode == "lend"  # capturable
    with pytest.raises(Exception, match="lend keeps gate/up of offload_strategy activations"):
        load_config({**lend, "offload_strategy": "inputs"})
    with pytest.raises(Exception, match="lend needs each training forward's backward"):
        load_config({**lend, "rl": "dpo"})
    with pytest.raises(Exception, match="cuda_graph: offload_weights_mode gap"):
        load_config({**base, "offload_weights": 3, "offload_weights_mode": "gap", "cuda_graph": True})


@pytest.mark.parametrize("mode", ["stream", "gap", "lend"])
def test_trainer_streams_and_restores(tiny_llama, gsm8k_small, tmp_path, monkeypatch, mode):
    """`offload_weights` (and its mode) reach the checkpoint function; at the end the weights are back in
    place for good (hooks off). On CPU the offload is plain recomputation: nothing streams."""
    import tunery.train.activations as acts
    from tunery.train.loop import train

    seen = []
    orig = acts.apply_checkpointing

    def spy(m, mode, **kw):
        fn = orig(m, mode, **kw)
        seen.append(((kw.get("stream_weights"), kw.get("weights_mode")), fn))
        return fn

    monkeypatch.setattr(acts, "apply_checkpointing", spy)
    cfg = {"base_model": str(tiny_llama), "adapter": "qlora", "load_in_4bit": True, "lora_r": 4,
           "lora_target_linear": True,
           "datasets": [{"path": str(gsm8k_small), "type": "alpaca", "field_instruction": "question",
                         "field_output": "answer"}],
           "sequence_len": 256, "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
           "gradient_checkpointing": "offload", "offload_weights": 1, "offload_weights_mode": mode,
           "offload_strategy": "activations" if mode == "lend" else "inputs",
           "output_dir": str(tmp_path / "run"), "progress_bar": False,
           "dataset_prepared_path": str(tmp_path / "prepared")}
    run = train(cfg)
    assert [s for s, _ in seen] == [(1, mode)]
    fn = seen[0][1]
    assert fn.weights is None  # detached at the end: hooks off, weights back
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["activations", "inputs"])
def test_gpu_streamed_weights_match_resident_ones_and_leave_the_gpu(strategy):
    """CUDA, real copies on the side stream: two steps give the gradients of the same model with every
    weight resident, and between steps the streamed blocks' 4-bit weights are not on the GPU."""
    base = _qmodel().cuda()
    grads, alloc = [], []
    for stream in (0, 2):
        m = copy.deepcopy(base)
        m.train()
        fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload=strategy, keep_on_gpu=1, stream_weights=stream)
        fn.min_bytes = 1024
        for _ in range(2):
            m.zero_grad(set_to_none=True)
            ids, pos = (t.cuda() for t in _batch())
            torch.manual_seed(7)
            h = m(ids, pos)
            ((h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()).backward()
        torch.cuda.synchronize()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad})
        alloc.append(torch.cuda.memory_allocated())
        if stream:
            block1 = sum(getattr(mod, name).numel() * getattr(mod, name).element_size()
                         for mod, name in quantized_buffers(m.model.layers[1]))
            assert all(not getattr(mod, name).is_cuda for mod, name in quantized_buffers(m.model.layers[1]))
            assert fn.weights.host_bytes >= 2 * block1 > 0
        del m, fn
    assert _max_diff(grads[1], grads[0]) < 1e-5


@pytest.mark.gpu
def test_gpu_streamed_blocks_take_two_slots_of_gpu_memory(monkeypatch):
    """Five of six blocks streamed: between steps the GPU holds two slots of one block's weights in
    place of five blocks' (no allocator churn: the slots are made once and the step's memory is flat)."""
    import test_offload

    monkeypatch.setitem(test_offload.HF, "num_hidden_layers", 6)
    base = _qmodel().cuda()
    block = sum(getattr(mod, name).numel() * getattr(mod, name).element_size()
                for mod, name in quantized_buffers(base.model.layers[0]))
    alloc, reserved = [], []
    for stream in (0, 5):
        m = copy.deepcopy(base)
        m.train()
        fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload="activations", keep_on_gpu=1,
                                 stream_weights=stream)
        fn.min_bytes = 1024
        if stream:  # off the GPU at setup, before the first step (whose peak counts too)
            assert not any(getattr(mod, name).is_cuda for i in range(5)
                           for mod, name in quantized_buffers(m.model.layers[i]))
        for step in range(3):
            m.zero_grad(set_to_none=True)
            ids, pos = (t.cuda() for t in _batch())
            h = m(ids, pos)
            ((h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()).backward()
            torch.cuda.synchronize()
            if step == 1:
                r1 = torch.cuda.memory_reserved()
        m.zero_grad(set_to_none=True)
        alloc.append(torch.cuda.memory_allocated())
        reserved.append(torch.cuda.memory_reserved() - r1)  # growth over the third step
        if stream:
            assert len(fn.weights.slots) == 2 and fn.weights.slots[0].numel() < block + 64 * 1024
        del m, fn, h
    saved = alloc[0] - alloc[1]
    assert 3 * block - 64 * 1024 <= saved <= 3 * block + 64 * 1024, (saved, block)
    assert reserved[1] == 0


def test_planner_suggests_streaming_before_smaller_micro_batches():
    """QLoRA that does not fit: the plan names the fewest streamed blocks that fit at the same micro-batch
    (and the predicted peak of that config), then a smaller micro-batch with every block streamed; never
    the "use qlora" advice to a QLoRA run."""
    from dataclasses import replace

    from test_plan import LLAMA_8B
    from tunery.train.plan import CONTEXT_RESERVE, ModelShape, Setup, peak_bytes, plan_shapes

    sh = ModelShape.from_hf(LLAMA_8B)
    s = Setup(seq_len=2048, micro_batch=2, adapter="qlora", double_quant=True, checkpointing="offload",
              keep_on_gpu=0, embed_on_cpu=True, mlp_recompute=True, ignored_labels=False,
              offload_strategy="activations")
    budget = peak_bytes(sh, replace(s, stream_weights=14))
    assert peak_bytes(sh, replace(s, stream_weights=13)) > budget
    r = plan_shapes(LLAMA_8B, s, budget + CONTEXT_RESERVE)
    assert not r.fits and r.suggestions[0].startswith("gradient_checkpointing: offload with offload_weights: 14 "), \
        r.suggestions
    tight = peak_bytes(sh, replace(s, stream_weights=32, micro_batch=1))
    assert peak_bytes(sh, replace(s, stream_weights=32)) > tight
    r = plan_shapes(LLAMA_8B, s, tight + CONTEXT_RESERVE)
    assert r.suggestions[0].startswith("micro_batch_size: 1 with gradient_accumulation_steps x2 and gradient_"
                                       "checkpointing: offload, offload_keep_on_gpu: 0 and offload_weights: 32"), \
        r.suggestions
    r = plan_shapes(LLAMA_8B, s, CONTEXT_RESERVE + 2**20)
    assert not any("use adapter: qlora" in x for x in r.suggestions), r.suggestions
    lora = plan_shapes(LLAMA_8B, replace(s, adapter="lora", double_quant=False), budget + CONTEXT_RESERVE)
    assert not any("offload_weights" in x for x in lora.suggestions), lora.suggestions


# ------------------------------------------------------------------ offload_weights_mode: gap (WeightGap)
def test_gap_returns_each_dropped_block_once_and_ahead_of_its_backward():
    from tunery.train.weight_stream import gap_returns

    for layers, n, keep in [(32, 16, 0), (32, 20, 1), (32, 5, 0), (32, 1, 0), (32, 30, 0), (6, 4, 0), (3, 1, 0),
                            (32, 16, 7), (32, 20, 9), (32, 5, 7), (32, 24, 11)]:
        sched = gap_returns(layers, n, keep)
        back = [b for start in sorted(sched, reverse=True) for b in sched[start]]
        assert back == list(range(n - 1, -1, -1))  # needed first, back first
        lo = layers - keep if keep >= 2 and layers - keep >= n else n  # the kept blocks' backward if it can
        assert all(lo <= start <= layers - 2 and all(b < start for b in bs) for start, bs in sched.items())
        assert max(len(bs) for bs in sched.values()) == -(-n // (layers - 1 - lo))
    assert gap_returns(32, 16, 7)[25] == [2, 1, 0] and min(gap_returns(32, 16, 7)) == 25
    assert gap_returns(32, 0) == {}
    assert gap_returns(32, 31) == {31: list(range(30, -1, -1))} and gap_returns(2, 5) == {1: [1, 0]}


@pytest.mark.parametrize("strategy", ["activations", "inputs"])
def test_gap_weights_leave_after_forward_and_return_in_backward(monkeypatch, strategy):
    import test_offload
    import tunery.quant.nf4 as nf4
    import tunery.train.activations as acts

    monkeypatch.setitem(test_offload.HF, "num_hidden_layers", 6)
    base, g0, m = _reference_and_copy()
    fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload=strategy, keep_on_gpu=1, stream_weights=3,
                             weights_mode="gap")
    fn.simulate, fn.min_bytes = True, 1024
    ws = fn.weights
    assert sorted(ws.blocks) == [0, 1, 2] and ws.schedule == {4: [2], 3: [1, 0]}
    owner = {id(mod): i for i in range(6) for mod, _ in quantized_buffers(m.model.layers[i])}
    events = []
    real = nf4.NF4Weight.dequantize

    def dequantize(self, *a, **k):
        i = owner.get(id(self))
        events.append(i)
        if i in ws.blocks:  # a dropped block's weight in use: its buffers are the device copies
            mine = [t for (mod, name, _, _), t in zip(ws.items[i], ws.gpu[i]) if mod is self and name == "packed"]
            assert mine and self.packed is mine[0], i
        return real(self, *a, **k)

    monkeypatch.setattr(nf4.NF4Weight, "dequantize", dequantize)
    returned = []
    orig_fetch = ws.fetch
    monkeypatch.setattr(ws, "fetch", lambda i: (i in ws.gpu or returned.append((i, len(events))), orig_fetch(i)))
    between: list = []
    layer0 = m.model.layers[0]
    excluded: list[set] = []  # what each block's group never copies, block 0 first
    group_init = acts._ActGroup.__init__
    monkeypatch.setattr(acts._ActGroup, "__init__",
                        lambda self, owner, exclude, sim: (excluded.append(set(exclude)), group_init(self, owner, exclude, sim))[1])
    for _ in range(2):
        excluded.clear()
        m.zero_grad(set_to_none=True)
        events.clear()
        returned.clear()
        between.clear()
        current = {getattr(mod, n).untyped_storage().data_ptr() for mod, n in quantized_buffers(layer0)}
        g = _run(m, spy=events, after_forward=lambda: between.append(sorted(ws.gpu)))
        assert between == [[]]  # every dropped block's weights left after its forward
        if strategy == "activations":  # the offload's "never copy a frozen weight" addresses are today's ones
            assert current <= excluded[0]  # (stale ones would keep activations on the GPU)
        assert _max_diff(g, g0) < 1e-5
        assert sorted(ws.gpu) == [0, 1, 2]  # all back after the backward, for the next forward
        assert [i for i, _ in returned] == [2, 1, 0]
        bwd = events[events.index("backward") + 1:]
        first_use = {i: events.index("backward") + 1 + bwd.index(i) for i in range(5)}
        at = dict(returned)  # 2 at block 4's backward start, 1 and 0 both at block 3's
        assert at[2] <= first_use[4] < at[1] == at[0] <= first_use[3] < first_use[2]
        for i in range(3):  # the modules point at the device copies again
            assert all(getattr(mod, name) is t for (mod, name, _, _), t in zip(ws.items[i], ws.gpu[i]))
            # one flat buffer per block each way (one copy, one allocation), each buffer a view into it
            assert {t.untyped_storage().data_ptr() for t in ws.gpu[i]} == {ws.flat[i].untyped_storage().data_ptr()}
            assert {h.untyped_storage().data_ptr() for _, _, h, _ in ws.items[i]} == {ws.host[i].data_ptr()}
            assert len(ws.gpu[i]) == 2 * 7  # 7 linears x (packed, absmax)
    # a forward with no backward, then evaluation: the blocks' pre-hooks bring the weights back
    ids, pos = _batch()
    m(ids, pos)
    assert not ws.gpu
    m.eval()
    with torch.no_grad():
        out = m(ids, pos)
        ref = copy.deepcopy(base).eval()(ids, pos)
    assert torch.allclose(out, ref, atol=1e-5) and sorted(ws.gpu) == [0, 1, 2]
    apply_checkpointing(m, "offload", mlp_chunk=None, offload=strategy)  # detached: hooks off, weights in
    assert not ws.handles and not ws.items
    with pytest.raises(ValueError, match="stream, gap or lend"):
        apply_checkpointing(m, "offload", stream_weights=2, weights_mode="slots")


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["activations", "inputs"])
def test_gpu_gap_weights_match_resident_ones_and_leave_between_forward_and_backward(monkeypatch, strategy):
    """CUDA, real copies back on the side stream: three steps give the gradients of the model with every
    weight resident; after each forward the dropped blocks' 4-bit bytes are off the GPU (allocated memory
    lower by exactly that), and after each backward they are all back."""
    import test_offload

    monkeypatch.setitem(test_offload.HF, "num_hidden_layers", 6)
    base = _qmodel().cuda()
    dropped = sum(-(-getattr(mod, name).numel() * getattr(mod, name).element_size() // 512) * 512  # allocator
                  for i in range(3) for mod, name in quantized_buffers(base.model.layers[i]))      # granules
    grads, after_fwd, after_bwd = [], [], []
    for n in (0, 3):
        m = copy.deepcopy(base)
        m.train()
        fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload=strategy, keep_on_gpu=1, stream_weights=n,
                                 weights_mode="gap")
        fn.min_bytes = 1024
        for _ in range(3):
            m.zero_grad(set_to_none=True)
            ids, pos = (t.cuda() for t in _batch())
            torch.manual_seed(7)
            h = m(ids, pos)
            torch.cuda.synchronize()
            after_fwd.append(torch.cuda.memory_allocated())
            if n:
                assert not any(getattr(mod, name).is_cuda for i in range(3)
                               for mod, name in quantized_buffers(m.model.layers[i]))
            ((h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()).backward()
            del h
            torch.cuda.synchronize()
            after_bwd.append(torch.cuda.memory_allocated())
            if n:
                assert all(getattr(mod, name).is_cuda for i in range(3) for mod, name in quantized_buffers(m.model.layers[i]))
        grads.append({k: p.grad.cpu() for k, p in m.named_parameters() if p.requires_grad})
        del m, fn
    assert _max_diff(grads[1], grads[0]) < 1e-5
    # from the first step on; exact once both runs are steady (the run without gap held 50 KB more after
    # its first two forwards than after its third on an H200, which is not gap's doing)
    saved = [a - b for a, b in zip(after_fwd[:3], after_fwd[3:])]
    assert all(x >= 0.9 * dropped for x in saved) and abs(saved[-1] - dropped) <= 4096, (saved, dropped, after_fwd)
    assert abs(after_bwd[2] - after_bwd[5]) <= 0.1 * dropped, (after_bwd, dropped)


def _lend_setup(monkeypatch, layers: int = 8, keep_on_gpu: int = 2):
    """An NF4 model of `layers` blocks on the fused path (CPU), and a copy with offload_weights_mode lend."""
    import tunery.models.decoder as dec
    from tunery.quant import quantize_model

    base = _model(dropout=0.0)
    while len(base.model.layers) < layers:
        base.model.layers.append(copy.deepcopy(base.model.layers[-1]))
    quantize_model(base)
    monkeypatch.setattr(dec, "use_triton_for", lambda x, *a, **k: True)  # the fused MLP, on CPU
    m = copy.deepcopy(base)
    m.train()
    fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload="activations", keep_on_gpu=keep_on_gpu)
    fn.simulate, fn.min_bytes = True, 1024
    fn.weights = WeightLend({i: layer for i, layer in enumerate(m.model.layers)}, simulate=True)
    fn.weights._take_all()
    return base, m, fn


def test_lend_keeps_gate_up_in_the_weights_memory_and_gives_the_plain_gradients(monkeypatch):
    """offload_weights_mode lend: later blocks keep gate/up in the memory of earlier blocks' 4-bit weights
    (their MLP skips the recompute), the weights come back before their block's backward, and two steps
    give the plain gradients; the arena holds the weights again after each step."""
    import tunery.kernels.lora as kl

    base, m, fn = _lend_setup(monkeypatch)
    lend = fn.weights
    original = lend.arena.clone()
    assert torch.equal(original, lend.host)
    seen = []
    orig = kl.FusedMLPFunction.apply
    monkeypatch.setattr(kl.FusedMLPFunction, "apply", lambda *a: seen.append(a[2].recompute) or orig(*a))
    restored = []
    real = WeightLend._restore
    monkeypatch.setattr(WeightLend, "_restore", lambda self, j: restored.append(j) or real(self, j))
    ids, pos = (t[:, :8].contiguous() for t in _batch())  # short rows: gate/up smaller than a block's weights
    ref = copy.deepcopy(base)
    for _ in range(2):
        seen.clear()
        restored.clear()
        grads = []
        for model in (ref, m):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(7)
            h = model(ids, pos)
            loss = (h.float() ** 2).mean() + model.logits(h).logsumexp(-1).mean()
            loss.backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
        assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) < 1e-5
        # the blocks that took the arena ran their MLP without the gate/up recompute; none before block 3
        took = [i for i, r in enumerate(seen[-8:]) if not r]
        assert lend.lent_blocks == len(took) >= 2 and min(took) >= 3, took
        assert sorted(restored) == sorted(set(restored)) and restored  # each dirty region copied back once
        assert not lend.dirty and not lend.borrowed and torch.equal(lend.arena, original)


def test_lend_refuses_a_second_forward_before_the_backward(monkeypatch):
    """Two training forwards then one backward would copy the weights back over the first forward's kept
    gate/up: the second forward raises, naming what to do. A forward whose graph was dropped is fine."""
    _, m, fn = _lend_setup(monkeypatch)
    ids, pos = (t[:, :8].contiguous() for t in _batch())
    h = m(ids, pos)
    assert fn.weights.lent_blocks >= 2
    with pytest.raises(RuntimeError, match="Run backward after each training forward"):
        m(ids, pos)
    del h
    import gc

    gc.collect()
    h = m(ids, pos)  # the first graph is gone: its regions are restored and lent again
    (h.float() ** 2).mean().backward()
    assert not fn.weights.dirty and torch.equal(fn.weights.arena, fn.weights.host)


def test_lend_limit_leaves_the_lag_before_each_block():
    """Block k may fill the arena up to the end of block k - 1 - lag's region (their forwards are done and
    the copy back has `lag` blocks of backward before block k - 1 - lag needs it)."""
    lend = WeightLend({}, lag=2, simulate=True)
    lend.regions = {i: (1024 * i, 1024 * (i + 1)) for i in range(6)}
    lend.arena = torch.zeros(6 * 1024, dtype=torch.uint8)
    assert [lend.limit(k) for k in range(6)] == [0, 0, 0, 1024, 2048, 3072]
    assert not lend.can_take(3, 1024) and lend.can_take(5, 2048)


@pytest.mark.gpu
def test_gpu_lend_matches_resident_weights_and_restores_them(monkeypatch):
    """CUDA, real copies back on their own stream: with offload_weights_mode lend, three steps give the
    gradients of the plain run, blocks keep gate/up in the lent weight memory, and after each backward the
    arena holds the 4-bit weights again, byte for byte."""
    import test_offload

    monkeypatch.setitem(test_offload.HF, "num_hidden_layers", 8)
    base = _qmodel().cuda()
    grads = []
    for mode in ("stream", "lend"):
        m = copy.deepcopy(base)
        m.train()
        fn = apply_checkpointing(m, "offload", mlp_chunk=None, offload="activations", keep_on_gpu=1,
                                 stream_weights=8 if mode == "lend" else 0, weights_mode=mode)
        fn.min_bytes = 1024
        for _ in range(3):
            m.zero_grad(set_to_none=True)
            ids, pos = (t[:, :8].contiguous().cuda() for t in _batch())  # gate/up smaller than a block's weights
            torch.manual_seed(7)
            h = m(ids, pos)
            ((h.float() ** 2).mean() + m.logits(h).logsumexp(-1).mean()).backward()
            del h
            torch.cuda.synchronize()
            if mode == "lend":
                assert fn.weights.lent_blocks >= 2 and not fn.weights.dirty
                assert torch.equal(fn.weights.arena.cpu(), fn.weights.host)
        grads.append({k: p.grad.cpu() for k, p in m.named_parameters() if p.requires_grad})
        del m, fn
    assert _max_diff(grads[1], grads[0]) < 1e-5
