"""DoRA (`peft_use_dora`): the same forward, gradients, saved format and merge as peft's DoRA; an
untrained DoRA layer is the base, on a quantized base too."""

from __future__ import annotations

import json

import pytest
import torch

from tunery.adapters import (
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    reset_dora_magnitudes,
    save_adapter,
)
from tunery.models import load_model

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # conftest skips gpu-marked tests without CUDA


def _peft_dora(tiny_llama, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_dora=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B is zero at init and the magnitude is ||W||: move all three
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.05 if "magnitude" not in name else 0.01))
    return pm


def _loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_dora_matches_peft_forward_gradients_and_format(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = _peft_dora(tiny_llama)
    pm.save_pretrained(str(tmp_path / "peft"))
    lm = load_model(str(tiny_llama))
    cfg = load_adapter(lm.model, tmp_path / "peft")
    assert cfg["use_dora"] and all(m.use_dora for m in lora_layers(lm.model).values())
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(1))
    pm.train()
    lm.model.train()
    theirs = pm(ids).logits
    ours = lm.model.logits(lm.model(ids))
    assert (ours - theirs).abs().max() < 1e-4
    _loss(theirs, ids).backward()
    _loss(ours, ids).backward()
    peft_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for name, m in lora_layers(lm.model).items():
        for ours_p, tag in ((m.lora_A, "lora_A.default.weight"), (m.lora_B, "lora_B.default.weight"),
                            (m.lora_magnitude, "lora_magnitude_vector.default.weight")):
            ref = peft_grads[f"base_model.model.{name}.{tag}"]
            assert (ours_p.grad - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item()), (name, tag)
    # Tunery's saved adapter: peft reads it (use_dora, the magnitudes) and gets the same logits
    out = save_adapter(lm.model, tmp_path / "ours", str(tiny_llama))
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32),
                                     str(out)).eval()
    lm.model.eval()
    with torch.no_grad():
        ref = lm.model.logits(lm.model(ids))
        assert (back(ids).logits - ref).abs().max() < 1e-4
        # merged: one plain weight per layer, the same function
        merged = merge_lora(lm.model)
        assert not lora_layers(merged)
        assert (merged.logits(merged(ids)) - ref).abs().max() < 1e-4


def test_untrained_dora_is_the_base_also_on_a_4bit_base(tiny_llama):
    """At injection m = ||W||_row: the layer is the base. After quantizing the base, the trainer sets m
    from the 4-bit weight again; without that the start would be off by the quantization error."""
    from tunery.quant import quantize_model

    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(2))
    base = load_model(str(tiny_llama)).model.eval()
    with torch.no_grad():
        ref = base.logits(base(ids))
    lm = load_model(str(tiny_llama))
    inject_lora(lm.model, TARGETS, r=4, alpha=8, use_dora=True)
    lm.model.eval()
    with torch.no_grad():
        assert (lm.model.logits(lm.model(ids)) - ref).abs().max() < 1e-5
    quantize_model(lm.model)
    plain = load_model(str(tiny_llama))
    inject_lora(plain.model, TARGETS, r=4, alpha=8)
    quantize_model(plain.model)
    plain.model.eval()
    with torch.no_grad():
        q_ref = plain.model.logits(plain.model(ids))  # the 4-bit base (LoRA B = 0)
        stale = (lm.model.logits(lm.model(ids)) - q_ref).abs().max()
        assert reset_dora_magnitudes(lm.model) == len(TARGETS) * len(lm.model.model.layers)
        assert (lm.model.logits(lm.model(ids)) - q_ref).abs().max() < 1e-5 < stale


def test_train_with_dora(tiny_llama, gsm8k_small, tmp_path):
    """`peft_use_dora: true` through `tunery train` (QLoRA): the magnitudes train and are saved."""
    from safetensors.torch import load_file

    from tunery.train.loop import train

    cfg = {"base_model": str(tiny_llama), "adapter": "qlora", "load_in_4bit": True, "peft_use_dora": True,
           "lora_r": 4, "lora_target_linear": True,
           "datasets": [{"path": str(gsm8k_small), "type": "alpaca", "field_instruction": "question",
                         "field_output": "answer"}],
           "sequence_len": 256, "micro_batch_size": 2, "max_steps": 3, "learning_rate": 1e-2,
           "output_dir": str(tmp_path / "run"), "progress_bar": False,
           "dataset_prepared_path": str(tmp_path / "prepared")}
    run = train(cfg)
    state = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    mags = [k for k in state if k.endswith("lora_magnitude_vector")]
    assert len(mags) == 7 * 2 and json.loads((run / "adapter" / "adapter_config.json").read_text())["use_dora"]
    lm = load_model(str(tiny_llama))
    inject_lora(lm.model, ["q_proj"], r=4, alpha=8, use_dora=True)
    first = lora_layers(lm.model)["model.layers.0.self_attn.q_proj"].lora_magnitude
    moved = state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    assert moved.shape == first.shape and not torch.allclose(moved, first, atol=1e-4)  # it trained


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_eval_ignores_dropout(tiny_llama, p):
    lm = load_model(str(tiny_llama))
    inject_lora(lm.model, ["q_proj"], r=4, alpha=8, dropout=p, use_dora=True)
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(4))
    lm.model.eval()
    with torch.no_grad():
        a = lm.model.logits(lm.model(ids))
        b = lm.model.logits(lm.model(ids))
    assert torch.equal(a, b)


def test_planner_counts_what_dora_saves(tiny_llama):
    """The planner's DoRA term is what autograd really keeps: per adapted linear, two [tokens, out]
    tensors more than LoRA (counted with saved-tensor hooks over a forward of the tiny model), up to a few
    [out] vectors per layer that the planner leaves out."""
    from dataclasses import replace

    from tunery.train.plan import ModelShape, Setup, estimate

    def saved_bytes(use_dora, quantized=False):
        lm = load_model(str(tiny_llama))
        inject_lora(lm.model, TARGETS, r=4, alpha=8, use_dora=use_dora)
        if quantized:
            from tunery.quant import quantize_model

            quantize_model(lm.model)
        lm.model.train()
        seen = {}
        stored = {t.untyped_storage().data_ptr() for t in (*lm.model.parameters(), *lm.model.buffers())}

        def pack(t):  # activations only: not the model's own parameters and (4-bit weight) buffers
            if t.untyped_storage().data_ptr() not in stored:
                seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
            return t

        ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(5))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm.model(ids)
        return sum(seen.values()), lm

    lora_b, lm = saved_bytes(False)
    dora_b, _ = saved_bytes(True)
    cfg = lm.model.cfg
    shape = ModelShape.from_hf({"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                                "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
                                "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
                                "head_dim": cfg.head_dim})
    s = Setup(seq_len=64, micro_batch=1, adapter="lora", targets=tuple(TARGETS), act_bytes=4)
    extra = (estimate(shape, replace(s, dora=True))["activations"]["block_inputs"]
             - estimate(shape, s)["activations"]["block_inputs"])
    dims = shape.linear_dims()
    vectors = 3 * 4 * sum(dims[n][1] for n in TARGETS) * cfg.num_layers  # per layer: m / n and the like, [out]
    assert 0 <= (dora_b - lora_b) - extra <= vectors, (extra, dora_b - lora_b, vectors)
    # on a 4-bit base DoRA keeps no dequantized weight (its products go through the 4-bit linear), so it
    # adds what it adds on a 16-bit base, and the planner says so
    q_lora, _ = saved_bytes(False, quantized=True)
    q_dora, _ = saved_bytes(True, quantized=True)
    q_extra = (estimate(shape, replace(s, adapter="qlora", dora=True))["activations"]["block_inputs"]
               - estimate(shape, replace(s, adapter="qlora"))["activations"]["block_inputs"])
    assert q_extra == extra
    assert 0 <= (q_dora - q_lora) - q_extra <= vectors, (q_extra, q_dora - q_lora, vectors)


@pytest.mark.parametrize("device", DEVICES)
def test_dora_on_a_4bit_base_saves_no_dequantized_weight(tiny_llama, device):
    """Autograd keeps no [out, in] tensor of a DoRA layer over a 4-bit base: under activation offload
    each one would be shipped to host memory at every forward."""
    from tunery.quant import quantize_model

    lm = load_model(str(tiny_llama))
    inject_lora(lm.model, TARGETS, r=4, alpha=8, dropout=0.1, use_dora=True)
    quantize_model(lm.model)
    lm.model.to(device).train()
    weight_shapes = {(m.out_features, m.in_features) for m in lora_layers(lm.model).values()}
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(8)).to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(lm.model.logits(lm.model(ids)), ids)
    assert shapes and not weight_shapes & set(shapes), sorted(weight_shapes & set(shapes))
    loss.backward()
    assert all(m.lora_magnitude.grad is not None for m in lora_layers(lm.model).values())


@pytest.mark.parametrize("device", DEVICES)
def test_dora_on_a_4bit_base_has_the_gradients_of_its_dequantized_weights(tiny_llama, device):
    """QLoRA + DoRA: the same forward and gradients as DoRA over 16-bit weights equal to the 4-bit ones."""
    from tunery.quant import quantize_model

    q = load_model(str(tiny_llama))
    inject_lora(q.model, TARGETS, r=4, alpha=8, use_dora=True)
    quantize_model(q.model)
    reset_dora_magnitudes(q.model)
    dense = load_model(str(tiny_llama))
    inject_lora(dense.model, TARGETS, r=4, alpha=8, use_dora=True)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, mod in dense.model.named_modules():  # the linears without adapters are 4-bit in q too
            if type(mod) is torch.nn.Linear and ".layers." in f".{name}":
                mod.weight.copy_(q.model.get_submodule(name).weight.dequantize())
        for mq, md in zip(lora_layers(q.model).values(), lora_layers(dense.model).values()):
            md.weight.copy_(mq.base_weight())  # the 16-bit twin holds the 4-bit weight's values
            for pq, pd in ((mq.lora_A, md.lora_A), (mq.lora_B, md.lora_B), (mq.lora_magnitude, md.lora_magnitude)):
                pq.add_(torch.randn(pq.shape, generator=g) * 0.05)
                pd.copy_(pq)
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(7)).to(device)
    for m in (q.model, dense.model):  # on CUDA the 4-bit side dequantizes with the Triton kernel
        m.to(device).train()
        _loss(m.logits(m(ids)), ids).backward()
    for (name, mq), md in zip(lora_layers(q.model).items(), lora_layers(dense.model).values()):
        for pq, pd in ((mq.lora_A, md.lora_A), (mq.lora_B, md.lora_B), (mq.lora_magnitude, md.lora_magnitude)):
            assert (pq.grad - pd.grad).abs().max() < 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized", [False, True])
def test_dora_keeps_the_activation_dtype_under_autocast(tiny_llama, quantized, device, monkeypatch):
    """bf16 weights, fp32 adapters and autocast (the trainer's setting): the norm comes out fp32 there,
    and a DoRA layer once returned fp32, turning every saved activation and the residual stream fp32
    (a QLoRA + DoRA step on a 1B model peaked at 4.28 GiB against 2.96 predicted)."""
    from tunery.quant import quantize_model

    if device == "cpu":  # CUDA's autocast runs linalg.norm in fp32; the CPU's keeps bf16: do as CUDA does
        norm = torch.linalg.norm
        monkeypatch.setattr(torch.linalg, "norm", lambda *a, **k: norm(*a, **k).float())
    lm = load_model(str(tiny_llama), torch.bfloat16)
    inject_lora(lm.model, TARGETS, r=4, alpha=8, use_dora=True)
    for p in lm.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if quantized:
        quantize_model(lm.model, compute_dtype=torch.bfloat16)
        reset_dora_magnitudes(lm.model)
    lm.model.to(device).train()
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for m in lora_layers(lm.model).values()]
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(9)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        hidden = lm.model(ids)
        loss = _loss(lm.model.logits(hidden), ids)
    for h in hooks:
        h.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16} and hidden.dtype == torch.bfloat16, (set(dtypes), hidden.dtype)
    loss.backward()
    mags = [m.lora_magnitude for m in lora_layers(lm.model).values()]
    assert all(m.grad is not None and m.grad.dtype == torch.float32 and m.grad.abs().sum() > 0 for m in mags)
