"""NF4 storage: the codebook, round-trip error, double quantization, the Triton kernel, the module
plumbing (state_dict, .to, LoRA before/after quantization) and the streaming loader."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn as nn

from tunery.quant import (
    NF4_CODE_VALUES,
    NF4Linear,
    NF4Weight,
    dequantize_nf4_reference,
    quantize_model,
    quantize_nf4,
)
from tunery.quant.nf4 import BLOCK, DYNAMIC_CODE_VALUES, dynamic_code, normal_float_code

# The 16 values printed in the QLoRA paper (appendix E) and used by bitsandbytes.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_codebook_values_exact():
    assert list(NF4_CODE_VALUES) == PAPER_NF4
    code = torch.tensor(NF4_CODE_VALUES)
    assert torch.all(code[1:] > code[:-1]) and code[7] == 0
    # and they are the normal quantiles the paper defines (offset 0.9677083)
    assert (normal_float_code() - code).abs().max() < 1e-6


def test_dynamic_code_shape():
    code = dynamic_code()
    assert code.numel() == 256 and -1.0 < code.min() < -0.99
    assert code.max() == 1.0 and (code == 0).sum() == 1 and torch.all(code[1:] >= code[:-1])
    assert len(DYNAMIC_CODE_VALUES) == 256


def test_exact_codebook_values_roundtrip():
    """A block holding exactly the codebook values (times its absmax) comes back bit-exact."""
    scale = 0.37
    w = torch.tensor(PAPER_NF4 * 8) * scale  # 128 values = 2 blocks, absmax = scale
    q = quantize_nf4(w)
    back = dequantize_nf4_reference(q["packed"], q["absmax"], w.numel(), torch.float32)
    assert torch.equal(back, (torch.tensor(PAPER_NF4 * 8) * torch.tensor(scale)).float())
    # packing: element 2i in the high nibble
    assert q["packed"][0].item() == (0 << 4) | 1 and q["packed"][7].item() == (14 << 4) | 15


@pytest.mark.parametrize("double_quant", [False, True])
def test_roundtrip_error_bounds(double_quant):
    torch.manual_seed(0)
    w = torch.randn(96, 200) * 0.02  # 19200 = 300 blocks
    q = NF4Weight.from_tensor(w, double_quant)
    back = q.dequantize()
    assert back.shape == w.shape and back.dtype == torch.float32
    # per element: at most half the widest gap of the code (0.30 -> 0.152) times the block absmax
    blocks = w.reshape(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    err = (back.reshape(-1, BLOCK) - blocks).abs()
    code = torch.tensor(PAPER_NF4)
    half_gap = 0.5 * (code[1:] - code[:-1]).max()  # -1 -> -0.696
    from tunery.quant.nf4 import block_scales

    stored = block_scales(q.absmax, q.absmax2, q.absmax_offset)[:, None]  # what dequantization multiplies by
    assert torch.all(err <= absmax * half_gap * (1 + 1e-6) + (stored - absmax).abs() + 1e-7)
    # on Gaussian weights the relative RMS error of NF4 is ~9.3%
    rel = ((back - w).norm() / w.norm()).item()
    assert 0.07 < rel < 0.11
    # the block absmax element itself is exact (code +-1) up to the scale's own quantization
    i = blocks.abs().argmax(1)
    got = back.reshape(-1, BLOCK).gather(1, i[:, None])
    want = blocks.gather(1, i[:, None])
    tol = 0.01 * absmax if double_quant else 1e-7 * absmax
    assert torch.all((got - want).abs() <= tol + 1e-9)
    bits = q.storage_bytes() * 8 / w.numel()
    assert bits == pytest.approx(4.5 if not double_quant else 4 + 8 / 64 + 64 / 19200, abs=0.01)


def test_double_quant_scale_roundtrip():
    from tunery.quant.nf4 import block_scales

    torch.manual_seed(1)
    w = torch.randn(512, 256) * torch.linspace(0.001, 0.1, 512)[:, None]  # scales over two decades
    single = quantize_nf4(w)
    double = quantize_nf4(w, double_quant=True)
    assert torch.equal(single["packed"], double["packed"])  # codes do not depend on how scales are stored
    exact = single["absmax"]
    approx = block_scales(double["absmax"], double["absmax2"], double["absmax_offset"])
    assert double["absmax"].dtype == torch.uint8 and double["absmax2"].numel() == math.ceil(exact.numel() / 256)
    # 8-bit dynamic code after subtracting the mean: error well under 1% of the largest scale per 256-block
    blockmax = (exact - exact.mean()).abs().reshape(-1, 256).amax(1).repeat_interleave(256)
    assert torch.all((approx - exact).abs() <= 0.0101 * blockmax + 1e-8)
    assert ((approx - exact).abs() / exact).median() < 0.01


def test_zero_and_odd_sizes():
    w = torch.zeros(3, 7)
    q = NF4Weight.from_tensor(w)
    assert torch.equal(q.dequantize(), w)
    w = torch.randn(5, 13)  # 65 elements: padded to 2 blocks
    q = NF4Weight.from_tensor(w, True)
    assert q.dequantize().shape == (5, 13)
    assert ((q.dequantize() - w).abs() <= w.abs().max() * 0.2).all()


def test_triton_kernel_matches_reference_cpu_interpreter(monkeypatch):
    """The Triton kernel under TRITON_INTERPRET=1 equals the plain-PyTorch reference bit for bit."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TUNERY_TRITON_ON_CPU", "1")
    import tunery.quant.triton_nf4 as tn

    tn = importlib.reload(tn)  # triton.jit picks the interpreter at decoration time
    try:
        torch.manual_seed(2)
        for double in (False, True):
            w = torch.randn(100, 70) * 0.05  # 7000 elements, not a multiple of the block
            q = NF4Weight.from_tensor(w, double)
            args = (q.packed, q.absmax, q.numel())
            extra = (q.absmax2, q.absmax_offset)
            for dtype in (torch.float32, torch.bfloat16):
                ref = dequantize_nf4_reference(*args, dtype, *extra)
                got = tn.dequantize_nf4_triton(*args, dtype, *extra)
                assert got.dtype == dtype
                if dtype == torch.float32:
                    assert torch.equal(got, ref)
                else:  # the interpreter's float->bf16 cast may round differently: 1 ulp (exact on GPU)
                    assert torch.allclose(got.float(), ref.float(), rtol=2**-7, atol=0)
            assert torch.equal(q.dequantize(), dequantize_nf4_reference(*args, torch.float32, *extra).view(100, 70))
    finally:
        monkeypatch.undo()
        importlib.reload(tn)


def test_module_plumbing_state_dict_and_to():
    torch.manual_seed(3)
    lin = nn.Linear(64, 32, bias=True)
    q = NF4Linear.from_linear(lin, double_quant=True)
    assert [n for n, _ in q.named_parameters()] == ["bias"] and not q.bias.requires_grad
    sd = q.state_dict()
    assert set(sd) == {"bias", "weight.packed", "weight.absmax", "weight.absmax2", "weight.absmax_offset"}
    # model-wide casts change the compute dtype only; stored codes and float32 scales stay
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.weight.absmax2.dtype == torch.float32
    assert q.weight.dequantize().dtype == torch.bfloat16
    q.float()
    assert q.weight.dtype == torch.float32
    # a fresh shell loads the state dict
    shell = NF4Linear(NF4Weight((32, 64), torch.float32, double_quant=True), torch.zeros(32))
    shell.load_state_dict(sd)
    assert torch.equal(shell.weight.dequantize(), q.weight.dequantize())
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), x @ q.weight.dequantize().t() + lin.bias, atol=1e-6)


@pytest.mark.parametrize("double_quant", [False, True])
def test_storage_as_parameters_for_fsdp_dequantizes_the_same(double_quant):
    """FSDP shards the 4-bit bytes as frozen parameters (parallel.shard_quantized_storage): the fast
    reads of the storage (from _buffers) fall back to them, alone and in a dequantize_many group."""
    from tunery.train.parallel import shard_quantized_storage

    torch.manual_seed(4)
    ws = [NF4Weight.from_tensor(torch.randn(o, 128), double_quant=double_quant) for o in (64, 32)]
    want = [w.dequantize() for w in ws]
    group = NF4Weight.dequantize_many(ws)
    holder = nn.ModuleList(ws)
    assert shard_quantized_storage(holder) == len(ws) * (4 if double_quant else 2)
    assert not ws[0]._buffers and isinstance(ws[0].packed, nn.Parameter)
    assert all(torch.equal(w.dequantize(), t) for w, t in zip(ws, want))
    assert all(torch.equal(a, b) for a, b in zip(NF4Weight.dequantize_many(ws), group))


def test_nf4_linear_grad_matches_dense():
    torch.manual_seed(4)
    w = NF4Weight.from_tensor(torch.randn(48, 64))
    x = torch.randn(5, 64, requires_grad=True)
    y = w.linear(x)
    assert len(y.grad_fn.saved_tensors) == 0  # the dequantized weight is not kept for backward
    (y.pow(2).sum()).backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w.dequantize().t()).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def _tiny_model(seed=0):
    from tunery.models.decoder import CausalLM
    from tunery.models.loading import _reset_buffers
    from tunery.models.registry import decoder_config

    hf = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)
    torch.manual_seed(seed)
    m = CausalLM(decoder_config(hf))
    for n, p in m.named_parameters():
        with torch.no_grad():
            p.copy_(torch.ones_like(p) if n.endswith("norm.weight") else torch.randn_like(p) * 0.05)
    _reset_buffers(m)
    return m, hf


def test_quantize_before_or_after_lora_injection_agree():
    from tunery.adapters import LINEAR_NAMES, LoRALinear, inject_lora, lora_layers, merge_lora

    a, _ = _tiny_model()
    b, _ = _tiny_model()
    inject_lora(a, list(LINEAR_NAMES), 4, 8)
    done = quantize_model(a)  # after injection
    assert len(done) == 14 and all(isinstance(m.weight, NF4Weight) for m in lora_layers(a).values())
    quantize_model(b)  # before injection: nn.Linear -> NF4Linear, then LoRA wraps it
    assert isinstance(b.model.layers[0].mlp.up_proj, NF4Linear)
    inject_lora(b, list(LINEAR_NAMES), 4, 8)
    assert isinstance(b.model.layers[0].mlp.up_proj, LoRALinear)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        ha, hb = a(ids), b(ids)
    assert torch.equal(ha, hb)
    # frozen base: only LoRA trains; embeddings/head untouched (skip list)
    names = [n for n, p in a.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert isinstance(a.lm_head, nn.Linear) and isinstance(a.model.embed_tokens, nn.Embedding)
    # merge folds the dequantized base
    merge_lora(a)
    with torch.no_grad():
        assert torch.allclose(a(ids), ha, atol=1e-5)


def test_streaming_loader_equals_quantize_model(tmp_path):
    """load_quantized (meta model, tensor by tensor) == load the full model, then quantize_model."""
    from safetensors.torch import save_file

    from tunery.models.decoder import CausalLM
    from tunery.models.loading import _reset_buffers, weight_files
    from tunery.models.registry import decoder_config
    from tunery.quant import load_quantized

    full, hf = _tiny_model(5)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "model.safetensors"))
    quantize_model(full, double_quant=True)
    with torch.device("meta"):
        streamed = CausalLM(decoder_config(hf))
    with pytest.raises(TypeError, match="weight_files"):
        load_quantized(streamed, tmp_path, "cpu", torch.float32)
    left = load_quantized(streamed, weight_files(tmp_path), "cpu", torch.float32, double_quant=True)
    assert set(left) == {"model.inv_freq"}
    _reset_buffers(streamed)
    sa, sb = full.state_dict(), streamed.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(full(ids), streamed(ids))


def test_cpu_embedding_offload():
    from tunery.quant import offload_embedding

    m, _ = _tiny_model(6)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        ref = m(ids)
    assert not offload_embedding(m)  # trainable: stays
    m.requires_grad_(False)
    assert offload_embedding(m)
    assert [n for n, _ in m.named_parameters()].count("model.embed_tokens.weight") == 1
    m.to(torch.float64)
    assert m.model.embed_tokens.weight.dtype == torch.float64
    m.float()
    with torch.no_grad():
        assert torch.equal(m(ids), ref)


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_gpu_triton_dequant_matches_reference(double_quant):
    torch.manual_seed(0)
    w = torch.randn(4096, 1000, device="cuda", dtype=torch.bfloat16) * 0.02
    q = NF4Weight.from_tensor(w, double_quant)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ref = dequantize_nf4_reference(q.packed, q.absmax, q.numel(), dtype, q.absmax2, q.absmax_offset)
        out = q.dequantize(dtype).reshape(-1)
        if double_quant and dtype == torch.float32:
            # the kernel fuses scale2 * code + offset into one FMA: fp32 results may differ in the last bit
            torch.testing.assert_close(out, ref, rtol=2**-22, atol=0)
        else:
            assert torch.equal(out, ref)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_same_bytes_as_bitsandbytes(device):
    """Same packed codes, absmax (and double-quantized absmax) and values as bitsandbytes' NF4."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = (torch.randn(1024, 768, dtype=torch.bfloat16) * 0.02).to(device)
    for double in (False, True):
        try:
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
            ref = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
        except Exception as e:  # a bitsandbytes build without this device's backend
            pytest.skip(f"bitsandbytes cannot quantize on {device}: {e}")
        q = NF4Weight.from_tensor(w, double)
        assert (packed.reshape(-1) == q.packed).float().mean().item() > 0.9999  # ties may round either way
        if double:  # the nested 8-bit codes: near-ties may land on the neighbouring code
            assert (state.absmax == q.absmax).float().mean().item() > 0.99
            assert (state.absmax.int() - q.absmax.int()).abs().max() <= 1
            assert torch.allclose(state.state2.absmax, q.absmax2) and torch.allclose(state.offset, q.absmax_offset[0])
        else:
            assert torch.equal(state.absmax, q.absmax)
        assert (q.dequantize().float() - ref.float()).abs().max() <= 0.01 * w.abs().max().item()
        # and our dequantization reads bitsandbytes' bytes as bitsandbytes does
        mine = NF4Weight(w.shape, torch.bfloat16, double, device=device)
        mine.packed.copy_(packed.reshape(-1))
        mine.absmax.copy_(state.absmax)
        if double:
            mine.absmax2.copy_(state.state2.absmax)
            mine.absmax_offset.copy_(state.offset.reshape(1))
        assert torch.equal(mine.dequantize(), ref)


@pytest.mark.gpu
def test_gpu_nf4_linear_keeps_no_dequantized_weight():
    """A stack of NF4 linears: forward keeps O(activations), not the dequantized weights."""
    torch.manual_seed(0)
    layers = [NF4Weight.from_tensor(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
              for _ in range(8)]
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layers[0].linear(x.detach())  # first matmul allocates cuBLAS's workspace (32 MiB on Hopper): not ours
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    h = x
    for w in layers:
        h = w.linear(h)
    kept = torch.cuda.memory_allocated() - base
    assert kept < 4096 * 4096 * 2  # less than one dequantized weight
    h.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
def test_gpu_cpu_embedding_rows_match_and_the_pinned_buffer_is_reused():
    """GPU ids: rows gathered on the host into page-locked buffers (two in turn), sent asynchronously;
    lookups in a row (the third refills the first buffer) all give the table's rows."""
    from tunery.quant.embedding import CPUEmbedding

    torch.manual_seed(0)
    w = torch.randn(1000, 64, dtype=torch.bfloat16)
    emb = CPUEmbedding(w)
    a = torch.randint(0, 1000, (2, 300), device="cuda")
    b = torch.randint(0, 1000, (2, 300), device="cuda")
    ra = emb(a)
    rb = emb(b)
    assert ra.device.type == "cuda" and ra.shape == (2, 300, 64)
    assert torch.equal(ra.cpu(), w[a.cpu()]) and torch.equal(rb.cpu(), w[b.cpu()])
    from tunery.kernels import with_host_copy

    host = torch.randint(0, 1000, (2, 300))
    assert torch.equal(emb(with_host_copy(host.cuda(), host)).cpu(), w[host])  # ids read from the host copy
    assert torch.equal(emb(a).cpu(), w[a.cpu()])  # a buffer used two lookups ago, refilled
    assert all(buf.is_pinned() for buf, _ in emb.__dict__["_ring"])


def test_host_copy_of_device_ids_is_kept_until_they_change():
    """The trainer keeps the CPU tensors of each batch beside the device copies (so a CPU-held embedding
    and the loss need no device-to-host sync); an in-place change of the device ids drops the host copy."""
    from types import SimpleNamespace

    from tunery.kernels import host_copy
    from tunery.train.loop import Trainer

    ids = torch.randint(0, 100, (2, 7))
    labels = ids.clone()
    batch = Trainer._to_device(SimpleNamespace(device=torch.device("meta")), {"input_ids": ids, "labels": labels,
                                                                             "n": 3})
    assert batch["n"] == 3 and batch["input_ids"].device.type == "meta"
    assert host_copy(batch["input_ids"]) is ids and host_copy(batch["labels"]) is labels
    assert host_copy(torch.empty(2, 7, dtype=torch.long)) is None
    batch["input_ids"].add_(1)  # changed on the device: the host copy no longer holds its values
    assert host_copy(batch["input_ids"]) is None
