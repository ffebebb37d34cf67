"""Fused kernels on a CUDA GPU in bf16 at real shapes, forward and backward.

Run: python -m pytest -m gpu tests/ -x

Each check compares the fused result and the plain bf16 reference against an fp32 "truth" computed
from the same inputs: the fused error must be at most about the reference's own bf16 error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF = torch.bfloat16
DEV = "cuda"


def _err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_as_good(got, ref, truth, factor: float = 2.0, rel: float = 2e-3, what: str = ""):
    """|got - truth| <= factor * |ref - truth| + rel * max|truth|."""
    e_got, e_ref = _err(got, truth), _err(ref, truth)
    bound = factor * e_ref + rel * truth.float().abs().max().item() + 1e-6
    assert e_got <= bound, f"{what}: fused error {e_got:.3g} > {bound:.3g} (bf16 reference error {e_ref:.3g})"


def _run(fn, inputs, r_seed=0):
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device=DEV).manual_seed(r_seed)
    loss = sum((o.float() * torch.randn(o.shape, device=DEV, generator=gen)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [x for x in xs if x.requires_grad], allow_unused=True)
    return [o.detach() for o in outs], grads


def check(fused, ref, inputs, what, factor=2.0, rel=2e-3):
    of, gf = _run(fused, inputs)
    orf, gr = _run(ref, inputs)
    ot, gt = _run(ref, [x.float() if x.is_floating_point() else x for x in inputs])
    for i, (a, b, t) in enumerate(zip(of, orf, ot)):
        assert_as_good(a, b, t, factor, rel, f"{what} out{i}")
    for i, (a, b, t) in enumerate(zip(gf, gr, gt)):
        if t is not None:
            assert_as_good(a, b, t, factor, rel, f"{what} grad{i}")


# ------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("shape,offset", [((4096, 4096), 0.0), ((4096, 3072), 1.0), ((2, 2048, 32, 128), 1.0)])
def test_rmsnorm_gpu(shape, offset):
    from tunery.kernels.rmsnorm import RMSNormFunction, rms_norm_reference

    torch.manual_seed(0)
    x = torch.randn(shape, device=DEV, dtype=BF) * 3
    w = (torch.randn(shape[-1], device=DEV) * 0.2 + (0.0 if offset else 1.0)).to(BF)
    check(lambda x, w: RMSNormFunction.apply(x, w, 1e-6, offset, True),
          lambda x, w: rms_norm_reference(x, w, 1e-6, offset), [x, w], f"rmsnorm{shape}")


@pytest.mark.parametrize("head_dim,partial", [(128, 1.0), (256, 1.0), (64, 0.5)])
def test_rope_gpu(head_dim, partial):
    from tunery.kernels.rope import RoPEFunction, apply_rope_reference, rope_cos_sin, rope_inv_freq

    torch.manual_seed(0)
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "partial_rotary_factor": partial}
    inv, scale = rope_inv_freq(head_dim, params)
    pos = torch.cat([torch.arange(1500), torch.arange(548)]).view(1, -1).expand(2, -1).to(DEV)
    cos, sin = rope_cos_sin(pos, inv, scale, BF)
    q = torch.randn(2, 2048, 32, head_dim, device=DEV, dtype=BF)
    k = torch.randn(2, 2048, 8, head_dim, device=DEV, dtype=BF)
    check(lambda q, k: RoPEFunction.apply(q, k, cos, sin), lambda q, k: apply_rope_reference(q, k, cos, sin),
          [q, k], f"rope d={head_dim}")


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh", "gelu"])
def test_gated_act_gpu(kind):
    from tunery.kernels.activations import GatedActFunction, gated_act_reference

    torch.manual_seed(0)
    g = torch.randn(4096, 14336, device=DEV, dtype=BF) * 2
    u = torch.randn(4096, 14336, device=DEV, dtype=BF)
    check(lambda g, u: GatedActFunction.apply(g, u, kind), lambda g, u: gated_act_reference(g, u, kind),
          [g, u], kind)


@pytest.mark.parametrize("softcap,z_loss,head_grad", [(None, 0.0, False), (30.0, 1e-4, True)])
def test_linear_cross_entropy_gpu(softcap, z_loss, head_grad):
    from tunery.kernels.cross_entropy import LinearCrossEntropyFunction, linear_cross_entropy_reference

    torch.manual_seed(0)
    n, h, v = 4096, 4096, 128256
    hid = torch.randn(n, h, device=DEV, dtype=BF)
    w = (torch.randn(v, h, device=DEV, dtype=BF) * 0.02)
    y = torch.randint(0, v, (n,), device=DEV)
    y[:300] = -100

    def fused(hid, w):
        return LinearCrossEntropyFunction.apply(hid, w, y, -100, softcap, z_loss, None, True) / 3796

    def ref(hid, w):
        return linear_cross_entropy_reference(hid, w, y, -100, softcap, z_loss) / 3796

    if head_grad:
        check(fused, ref, [hid, w], "linear CE (head grad)", rel=5e-3)
    else:
        check(lambda hid: fused(hid, w), lambda hid: ref(hid, w.to(hid.dtype)), [hid], "linear CE", rel=5e-3)


def test_token_logprobs_gpu():
    from tunery.kernels.cross_entropy import TokenLogprobsFunction, token_logprobs_reference

    torch.manual_seed(0)
    n, h, v = 2048, 2048, 128256
    hid = torch.randn(n, h, device=DEV, dtype=BF)
    w = torch.randn(v, h, device=DEV, dtype=BF) * 0.02
    y = torch.randint(0, v, (n,), device=DEV)
    y[:100] = -100
    check(lambda hid: TokenLogprobsFunction.apply(hid, w, y, -100, None, None, True),
          lambda hid: token_logprobs_reference(hid, w.to(hid.dtype), y, -100, None), [hid], "token logprobs",
          rel=5e-3)


# ------------------------------------------------------------------------------------- fused LoRA


def _lora_layer(i, o, r=16, dtype=BF):
    from tunery.adapters.lora import LoRALinear

    base = nn.Linear(i, o, bias=False, device=DEV, dtype=dtype)
    nn.init.normal_(base.weight, 0, 0.02)
    m = LoRALinear(base, r, 32.0)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.02)
    return m


def test_fused_lora_mlp_gpu():
    from tunery.kernels.activations import gated_act_reference
    from tunery.kernels.lora import fused_mlp
    from tunery.kernels.rmsnorm import rms_norm_reference
    from tunery.models.decoder import linear_spec

    torch.manual_seed(0)
    d, i = 4096, 14336
    g, u, dn = _lora_layer(d, i), _lora_layer(d, i), _lora_layer(i, d)
    nw = (torch.randn(d, device=DEV) * 0.1 + 1).to(BF)
    x = torch.randn(2, 1024, d, device=DEV, dtype=BF)
    lora = [g.lora_A, g.lora_B, u.lora_A, u.lora_B, dn.lora_A, dn.lora_B]

    def ref(x, *p):
        hn = rms_norm_reference(x, nw.to(x.dtype), 1e-5, 0.0)
        s = g.scale

        def lin(m, h, a, b):
            return h @ m.weight.to(h.dtype).t() + s * (h @ a.t()) @ b.t()

        h = gated_act_reference(lin(g, hn, p[0], p[1]), lin(u, hn, p[2], p[3]), "silu")
        return lin(dn, h, p[4], p[5])

    for recompute in (False, True):
        def fused(x, *p, recompute=recompute):
            specs = [linear_spec(m) for m in (g, u, dn)]
            for s_, (a, b) in zip(specs, [(p[0], p[1]), (p[2], p[3]), (p[4], p[5])]):
                s_.lora_a, s_.lora_b = a, b
            return fused_mlp(x, *specs, kind="silu", norm_weight=nw, eps=1e-5, recompute=recompute)

        check(fused, ref, [x, *lora], f"fused LoRA MLP recompute={recompute}", rel=5e-3)


def test_fused_lora_qkv_gpu():
    from tunery.kernels.lora import fused_linears
    from tunery.kernels.rmsnorm import rms_norm_reference
    from tunery.models.decoder import linear_spec

    torch.manual_seed(0)
    d = 4096
    q, k, v = _lora_layer(d, 4096), _lora_layer(d, 1024), _lora_layer(d, 1024)
    nw = (torch.randn(d, device=DEV) * 0.1 + 1).to(BF)
    x = torch.randn(2, 1024, d, device=DEV, dtype=BF)
    ps = [q.lora_A, q.lora_B, k.lora_A, k.lora_B, v.lora_A, v.lora_B]

    def ref(x, *p):
        hn = rms_norm_reference(x, nw.to(x.dtype), 1e-5, 0.0)
        return tuple(hn @ m.weight.to(x.dtype).t() + m.scale * (hn @ p[2 * j].t()) @ p[2 * j + 1].t()
                     for j, m in enumerate((q, k, v)))

    def fused(x, *p):
        specs = [linear_spec(m) for m in (q, k, v)]
        for j, s_ in enumerate(specs):
            s_.lora_a, s_.lora_b = p[2 * j], p[2 * j + 1]
        return tuple(fused_linears(x, specs, nw, 1e-5, 0.0))

    check(fused, ref, [x, *ps], "fused LoRA QKV", rel=5e-3)


# -------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("backend,window,softcap,head_dim", [
    ("flash", None, None, 128), ("flash", 512, None, 128), ("flash", None, None, 256),
    ("flex", None, 50.0, 128), ("flex", 512, 50.0, 256), ("auto", 700, None, 64),
])
def test_varlen_attention_gpu(backend, window, softcap, head_dim):
    from tunery.kernels.attention import varlen_attention, varlen_attention_reference

    torch.manual_seed(0)
    lens = [1000, 37, 1500, 1559]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
    n = sum(lens)
    q = torch.randn(n, 16, head_dim, device=DEV, dtype=BF)
    k = torch.randn(n, 4, head_dim, device=DEV, dtype=BF)
    v = torch.randn(n, 4, head_dim, device=DEV, dtype=BF)
    scale = head_dim ** -0.5
    check(lambda q, k, v: varlen_attention(q, k, v, cu, max(lens), scale, window, softcap, backend=backend),
          lambda q, k, v: varlen_attention_reference(q, k, v, cu, scale, window, softcap),
          [q, k, v], f"attention {backend} w={window} cap={softcap} d={head_dim}", rel=5e-3)


@pytest.mark.parametrize("heads,kv", [(32, 8), (16, 16)])
def test_dense_attention_gpu(heads, kv):
    """One document per row: auto takes the batched SDPA path (cuDNN first) and matches the
    per-document reference in values and gradients."""
    from tunery.kernels.attention import one_doc_per_row, varlen_attention, varlen_attention_reference

    torch.manual_seed(0)
    rows, t = 2, 2048
    n = rows * t
    cu = torch.arange(0, n + 1, t, device=DEV, dtype=torch.int32)
    assert one_doc_per_row(n, cu, t) == rows
    q = torch.randn(n, heads, 128, device=DEV, dtype=BF)
    k = torch.randn(n, kv, 128, device=DEV, dtype=BF)
    v = torch.randn(n, kv, 128, device=DEV, dtype=BF)
    check(lambda q, k, v: varlen_attention(q, k, v, cu, t, 128 ** -0.5, backend="auto"),
          lambda q, k, v: varlen_attention_reference(q, k, v, cu, 128 ** -0.5),
          [q, k, v], f"dense attention {heads}/{kv}", rel=5e-3)


def test_flash_backend_is_used_for_llama_shapes():
    from tunery.kernels.attention import pick_backend

    q = torch.empty(16, 32, 128, device=DEV, dtype=BF)
    assert pick_backend(q, None, None) == "flash"
    assert pick_backend(q, 4096, None) in ("flash", "flex")
    assert pick_backend(q, None, 50.0) == "flex"


# ---------------------------------------------------------------------------------------- decoder

_SMALL = dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)

_FAMILIES = {
    "llama": dict(model_type="llama", **_SMALL),
    "qwen3": dict(model_type="qwen3", head_dim=64, **_SMALL),
    "qwen2": dict(model_type="qwen2", **_SMALL),
    "gemma2": dict(model_type="gemma2", head_dim=64, sliding_window=128, query_pre_attn_scalar=64,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   hidden_activation="gelu_pytorch_tanh", **_SMALL),
    "gemma3": dict(model_type="gemma3_text", head_dim=64, sliding_window=128, query_pre_attn_scalar=64,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   rope_local_base_freq=10000.0, rope_theta=1e6, hidden_activation="gelu_pytorch_tanh", **_SMALL),
}


def _decoder(cfg, lora: bool, dtype):
    from tunery.adapters.lora import LINEAR_NAMES, inject_lora
    from tunery.models import build_own

    torch.manual_seed(0)
    m = build_own(cfg, torch.float32, DEV)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0.0 if m.cfg.norm_offset else 1.0, 0.1)
    if lora:
        inject_lora(m, list(LINEAR_NAMES), r=16, alpha=32)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    return m.to(dtype)


def _loss_and_grads(m, ids, pos, fused):
    from tunery.kernels.cross_entropy import linear_cross_entropy
    from tunery.models.fused import set_fused

    set_fused(m, fused)
    m.zero_grad(set_to_none=True)
    h = m(ids, pos)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    loss = linear_cross_entropy(h, m.head_weight, labels, softcap=m.cfg.final_softcap) / ids.numel()
    loss.backward()
    set_fused(m, True)
    return loss.detach().float(), h.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()
                                                 if p.grad is not None}


@pytest.mark.parametrize("family", list(_FAMILIES))
@pytest.mark.parametrize("lora", [True, False])
def test_decoder_fused_vs_plain_gpu(family, lora):
    cfg = _FAMILIES[family]
    torch.manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (1, 1024), device=DEV)
    pos = torch.cat([torch.arange(300), torch.arange(724)]).view(1, -1).to(DEV)
    m32 = _decoder(cfg, lora, torch.float32)
    lt, ht, gt = _loss_and_grads(m32, ids, pos, False)
    m16 = _decoder(cfg, lora, BF)
    lf, hf, gf = _loss_and_grads(m16, ids, pos, True)
    lr, hr, gr = _loss_and_grads(m16, ids, pos, False)
    assert abs(lf.item() - lt.item()) <= 2 * abs(lr.item() - lt.item()) + 2e-3 * abs(lt.item())
    assert_as_good(hf, hr, ht, 2.0, 1e-2, f"{family} hidden")
    for k in gt:
        assert_as_good(gf[k], gr[k], gt[k], 2.0, 2e-2, f"{family} grad {k}")


def test_mlp_recompute_saves_memory_and_matches_gpu():
    from tunery.models.fused import set_mlp_recompute

    cfg = dict(_FAMILIES["llama"], intermediate_size=8192)
    m = _decoder(cfg, True, BF)
    ids = torch.randint(0, cfg["vocab_size"], (1, 4096), device=DEV)
    pos = torch.arange(4096, device=DEV)[None]
    out = []
    for rec in (False, True):
        set_mlp_recompute(m, rec)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, _, grads = _loss_and_grads(m, ids, pos, True)
        out.append((loss, grads, torch.cuda.max_memory_allocated() - base))
    (l0, g0, m0), (l1, g1, m1) = out
    assert torch.equal(l0, l1)  # same GEMMs again: bitwise the same forward
    for k in g0:  # flash backward accumulates dq with atomics: not bitwise
        torch.testing.assert_close(g0[k].float(), g1[k].float(), atol=1e-3, rtol=2e-2)
    assert m1 < m0


def test_compile_blocks_gpu():
    from tunery.models.fused import compile_blocks

    cfg = _FAMILIES["llama"]
    m = _decoder(cfg, True, BF)
    ids = torch.randint(0, cfg["vocab_size"], (1, 512), device=DEV)
    pos = torch.arange(512, device=DEV)[None]
    l0, _, g0 = _loss_and_grads(m, ids, pos, True)
    assert compile_blocks(m) == cfg["num_hidden_layers"]
    l1, _, g1 = _loss_and_grads(m, ids, pos, True)
    assert abs(l0.item() - l1.item()) < 1e-2 * abs(l0.item())
    assert g0.keys() == g1.keys()
