"""Fused autograd Functions on CPU with their plain-PyTorch inner ops (no Triton): chunked linear CE,
token log-probs, fused LoRA projections / MLP against the LoRALinear modules, FlexAttention masks.

The Triton kernels themselves are checked in test_kernels_interp.py (interpreter) and
test_kernels_gpu.py (CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tunery.adapters.lora import LoRALinear
from tunery.kernels import kernels_enabled, set_kernels_enabled, use_triton_for
from tunery.kernels.attention import (
    flex_available,
    pick_backend,
    varlen_attention,
    varlen_attention_reference,
)
from tunery.kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
    token_logprobs,
    token_logprobs_reference,
)
from tunery.kernels.lora import fused_linears, fused_mlp
from tunery.kernels.rmsnorm import rms_norm_reference
from tunery.models.decoder import linear_spec


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("softcap,z_loss,every", [(None, 0.0, 3), (4.0, 1e-3, 3), (4.0, 1e-3, 20)])
def test_linear_cross_entropy_fused_matches_reference(softcap, z_loss, every):
    """every=3: many ignored rows, dropped before the head; every=20: few, computed and masked."""
    torch.manual_seed(0)
    h = torch.randn(45, 16, requires_grad=True)
    w = (torch.randn(130, 16) * 0.5).requires_grad_()
    y = torch.randint(0, 130, (45,))
    y[::every] = -100
    got = linear_cross_entropy(h, w, y, softcap=softcap, z_loss=z_loss, fused=True, chunk_size=8)
    ref = linear_cross_entropy_reference(h, w, y, softcap=softcap, z_loss=z_loss)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(got * 0.37, [h, w]), _grads(ref * 0.37, [h, w])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("every", [3, 20])
def test_linear_cross_entropy_counts_ignored_labels_on_the_host_copy(monkeypatch, every):
    """With a host copy of the labels (kernels.with_host_copy, as the trainer keeps for each batch)
    the ignored rows are found there, never with nonzero() over the device labels (a device-to-host
    sync every step on a GPU): the same loss and gradients."""
    from tunery.kernels import with_host_copy

    torch.manual_seed(0)
    h = torch.randn(2, 45, 16, requires_grad=True)
    w = torch.randn(130, 16) * 0.5
    y = torch.randint(0, 130, (2, 45))
    y[:, ::every] = -100
    ref = linear_cross_entropy(h, w, y, fused=True, chunk_size=8)
    (g_ref,) = _grads(ref, [h])
    source, scanned = {}, []  # mask storage -> the storage it was computed from; what nonzero() scanned
    ne, nz = torch.Tensor.__ne__, torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "__ne__", lambda t, o: source.setdefault(id(r := ne(t, o)), t.data_ptr()) and r)
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda t, *a, **k: scanned.append(source.get(id(t))) or nz(t, *a, **k))
    dev_y = y.clone()
    with_host_copy(dev_y, y)
    source.clear()  # (ids and addresses of dead tensors get reused)
    scanned.clear()
    got = linear_cross_entropy(h, w, dev_y, fused=True, chunk_size=8)
    assert dev_y.data_ptr() not in scanned
    (g,) = _grads(got, [h])
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g, g_ref)
    dev_y.add_(0)  # changed since: the host copy no longer holds its values
    source.clear()
    linear_cross_entropy(h, w, dev_y, fused=True, chunk_size=8)
    assert dev_y.data_ptr() in scanned


def test_shifted_labels_carry_their_host_copy():
    from tunery.kernels import host_copy, with_host_copy
    from tunery.methods.common import shifted_labels

    labels = torch.tensor([[5, 6, 7, -100, 9, 10]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1]])
    batch = {"labels": with_host_copy(labels.clone(), labels), "position_ids": with_host_copy(pos.clone(), pos)}
    out = shifted_labels(batch)
    assert out.tolist() == [[6, 7, -100, -100, 10, -100]]
    assert torch.equal(host_copy(out), out)
    assert host_copy(shifted_labels({"labels": labels, "position_ids": pos})) is None


def test_linear_cross_entropy_edge_cases():
    torch.manual_seed(0)
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen head: no weight grad is computed
    y = torch.full((6,), -100)
    loss = linear_cross_entropy(h, w, y, fused=True)
    assert loss.item() == 0.0
    (g,) = _grads(loss, [h])
    assert torch.count_nonzero(g) == 0
    y = torch.randint(0, 20, (6,))
    with torch.no_grad():
        a = linear_cross_entropy(h, w, y, fused=True)
    torch.testing.assert_close(a, linear_cross_entropy_reference(h.detach(), w, y))


def test_linear_cross_entropy_fused_under_autocast_with_fp32_weights():
    """Full fine-tuning: fp32 master weights under bf16 autocast. The fused loss (gradients computed in
    its forward with out= / in-place matmuls) must run, give fp32 gradients, and match the reference."""
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    y = torch.randint(0, 100, (64,))
    y[:40] = -100  # prompt-masked rows: the fused path gathers the kept rows
    h2, w2 = (t.detach().clone().requires_grad_() for t in (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, fused=True)
        ref = linear_cross_entropy_reference(h2, w2, y)
    loss.backward()
    ref.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert torch.allclose(loss, ref, rtol=1e-3)
    assert torch.allclose(h.grad, h2.grad, atol=2e-2 * h2.grad.abs().max().item())
    assert torch.allclose(w.grad, w2.grad, atol=2e-2 * w2.grad.abs().max().item())


def test_token_logprobs_fused_matches_reference():
    torch.manual_seed(0)
    h = torch.randn(30, 16, requires_grad=True)
    w = (torch.randn(90, 16) * 0.5).requires_grad_()
    y = torch.randint(0, 90, (30,))
    y[5:9] = -100
    got = token_logprobs(h, w, y, softcap=3.0, fused=True, chunk_size=7)
    ref = token_logprobs_reference(h, w, y, softcap=3.0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert got[5:9].abs().sum() == 0
    r = torch.randn(30)
    for a, b in zip(_grads((got * r).sum(), [h, w]), _grads((ref * r).sum(), [h, w])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _lora(base: nn.Module, r=4, alpha=8.0) -> LoRALinear:
    m = LoRALinear(base, r, alpha)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.2)
    return m


def _params(mods):
    return [p for m in mods for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("with_lora,alphas", [(True, (8.0, 8.0, 8.0)), (True, (8.0, 4.0, 12.0)), (False, None)])
def test_fused_norm_qkv_matches_modules(with_lora, alphas):
    """Mixed alphas: the scales folded into the cached A differ per projection of the group."""
    torch.manual_seed(0)
    d = 24
    mk = (lambda o, al: _lora(nn.Linear(d, o, bias=True), alpha=al)) if with_lora else (
        lambda o, al: nn.Linear(d, o, bias=True))
    q, k, v = (mk(o, al) for o, al in zip((32, 16, 16), alphas or (None,) * 3))
    nw = nn.Parameter(torch.randn(d) * 0.3 + 1)
    x = torch.randn(2, 5, d, requires_grad=True)
    params = [x, nw, *_params([q, k, v])]
    outs = fused_linears(x, [linear_spec(m) for m in (q, k, v)], nw, 1e-6, 0.0, use_triton=False)
    hn = rms_norm_reference(x, nw, 1e-6, 0.0)
    refs = [q(hn), k(hn), v(hn)]
    r = [torch.randn_like(o) for o in refs]
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ga = _grads(sum((o * ri).sum() for o, ri in zip(outs, r)), params)
    gb = _grads(sum((o * ri).sum() for o, ri in zip(refs, r)), params)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("with_lora", [True, False])
def test_fused_mlp_matches_modules(recompute, with_lora):
    from tunery.kernels.activations import gated_act_reference

    torch.manual_seed(0)
    d, i = 16, 40
    mk = (lambda a, b: _lora(nn.Linear(a, b, bias=False))) if with_lora else (lambda a, b: nn.Linear(a, b, bias=False))
    g, u, dn = mk(d, i), mk(d, i), mk(i, d)
    x = torch.randn(3, 4, d, requires_grad=True)
    params = [x, *_params([g, u, dn])]
    got = fused_mlp(x, linear_spec(g), linear_spec(u), linear_spec(dn), "silu", recompute=recompute,
                    use_triton=False)
    ref = dn(gated_act_reference(g(x), u(x), "silu"))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    r = torch.randn_like(ref)
    for a, b in zip(_grads((got * r).sum(), params), _grads((ref * r).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_linear_spec_rules():
    lin = nn.Linear(4, 4)
    m = LoRALinear(nn.Linear(4, 4), 2, 4.0, dropout=0.1)
    assert linear_spec(lin).lora_a is None
    m.train()
    assert linear_spec(m) is None  # active dropout: the plain path keeps its exact semantics
    m.eval()
    assert linear_spec(m).lora_a is m.lora_A
    m.enabled = False
    assert linear_spec(m).lora_a is None  # adapters_disabled(): the base model
    assert linear_spec(nn.Conv1d(4, 4, 1)) is None


def test_qlora_weight_fn_is_not_kept():
    nf4 = pytest.importorskip("tunery.quant.nf4")
    torch.manual_seed(0)
    base = nf4.NF4Linear.from_linear(nn.Linear(64, 64, bias=False))
    m = _lora(base)
    spec = linear_spec(m)
    assert spec.weight is None and spec.weight_fn is not None
    x = torch.randn(3, 64, requires_grad=True)
    got = fused_linears(x, [spec])[0]
    ref = m(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    params = [x, m.lora_A, m.lora_B]
    for a, b in zip(_grads(got.sum(), params), _grads(ref.sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not flex_available(), reason="no FlexAttention in this torch")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_document_mask_matches_reference():
    torch.manual_seed(0)
    n, h, hk, d = 40, 4, 2, 16
    q, k, v = torch.randn(n, h, d), torch.randn(n, hk, d), torch.randn(n, hk, d)
    cu = torch.tensor([0, 13, 30, 40], dtype=torch.int32)
    for window, softcap in [(None, None), (5, None), (None, 2.0), (6, 3.0)]:
        got = varlen_attention(q, k, v, cu, 17, 0.3, window, softcap, backend="flex")
        ref = varlen_attention_reference(q, k, v, cu, 0.3, window, softcap)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_dense_backend_for_one_document_per_row():
    """Rows that are each one whole document go to batched SDPA ("dense"): same result as the
    per-document reference; packed rows (or a ragged max_seqlen) are told apart from shapes alone."""
    from tunery.kernels.attention import one_doc_per_row

    torch.manual_seed(0)
    rows, t, h, hk, d = 3, 11, 4, 2, 16
    n = rows * t
    q, k, v = torch.randn(n, h, d), torch.randn(n, hk, d), torch.randn(n, hk, d)
    cu = torch.arange(0, n + 1, t, dtype=torch.int32)
    assert one_doc_per_row(n, cu, t) == rows
    got = varlen_attention(q, k, v, cu, t, 0.3, backend="dense")
    torch.testing.assert_close(got, varlen_attention_reference(q, k, v, cu, 0.3), atol=1e-5, rtol=1e-5)
    packed = torch.tensor([0, 5, 11, 22, 33], dtype=torch.int32)  # row 0 holds two documents
    assert one_doc_per_row(n, packed, 11) is None
    assert one_doc_per_row(n, cu, t - 1) is None
    with pytest.raises(ValueError, match="one document per row"):
        varlen_attention(q, k, v, packed, 11, 0.3, backend="dense")


@pytest.mark.parametrize("recompute", [False, True])
def test_lora_b_inside_the_base_gemm_matches_the_plain_path(recompute):
    """K-concat groups ([xn | s xn A^T] @ [W | B_blockdiag]^T over quantized bases, on CPU through the
    plain-PyTorch pieces): the same outputs and gradients as the separate LoRA product, for q/k/v
    with different scales and for the MLP's gate/up (with and without their recompute)."""
    import tunery.kernels.lora as kl
    from tunery.quant.nf4 import NF4Weight

    torch.manual_seed(0)
    d, i, r = 64, 128, 4
    qs = [NF4Weight.from_tensor(torch.randn(o, n) * 0.2, dtype=torch.float32) for o, n in
          [(64, d), (32, d), (32, d), (i, d), (i, d), (d, i)]]
    ab = [(nn.Parameter(torch.randn(r, q.shape[1]) * 0.3), nn.Parameter(torch.randn(q.shape[0], r) * 0.3)) for q in qs]
    scales = [2.0, 0.5, 1.0, 2.0, 2.0, 2.0]
    specs = [kl.LinearSpec(None, None, a, b, sc, weight_fn=q.dequantize, quant=q) for q, (a, b), sc in zip(qs, ab, scales)]
    nw = nn.Parameter(torch.randn(d) * 0.2 + 1)
    params = [nw, *[t for pair in ab for t in pair]]

    def run(kcat):
        kl.set_lora_kcat(kcat)
        try:
            x = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(1), requires_grad=True)
            outs = [*kl.fused_linears(x, specs[:3], nw, 1e-6, 0.0, use_triton=False),
                    kl.fused_mlp(x, *specs[3:], norm_weight=nw, recompute=recompute, use_triton=False)]
            loss = sum((o * torch.cos(torch.arange(o.numel()).view_as(o) * 0.1)).sum() for o in outs)
            return outs, torch.autograd.grad(loss, [x, *params])
        finally:
            kl.set_lora_kcat(False)

    (o0, g0) = run(False)
    calls = []
    orig = kl._kcat_weight
    kl._kcat_weight = lambda *a: calls.append(1) or orig(*a)
    try:
        o1, g1 = run(True)
    finally:
        kl._kcat_weight = orig
    assert len(calls) == 4  # q/k/v and gate/up, each forward and backward (the recompute shares it)
    for a, b in zip(o0 + list(g0), o1 + list(g1)):  # fp32, summed in another order
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cast_params_cache_follows_the_optimizer_and_in_place_changes(monkeypatch):
    """The cached bf16 copies of fp32 adapters (scaled, or not) are refreshed after every optimizer
    step (a fused AdamW step does not bump tensor versions), all at once and in place (no per-entry
    cast), and recast after any in-place change; plain tensors are never cached."""
    import tunery.kernels as kernels
    from tunery.kernels import cast_params

    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(2, 8))
    c1 = cast_params([a, b], torch.bfloat16)
    assert c1.dtype == torch.bfloat16 and c1.shape == (6, 8)
    assert cast_params([a, b], torch.bfloat16) is c1
    single = cast_params([a], torch.bfloat16)  # a second entry on the same parameter
    scaled = cast_params([b], torch.bfloat16, 2.0)
    mixed = cast_params([a, b], torch.bfloat16, (0.5, 3.0))
    assert cast_params([a, b], torch.bfloat16) is c1 and cast_params([a], torch.bfloat16) is single
    torch.testing.assert_close(mixed, torch.cat([a * 0.5, b * 3.0]).detach().bfloat16())
    casts = []
    orig = kernels._cast
    monkeypatch.setattr(kernels, "_cast", lambda *x: casts.append(x) or orig(*x))
    for kw in ({"fused": True}, {"foreach": False}):
        opt = torch.optim.AdamW([a, b], lr=0.1, **kw)
        (a.sum() + b.sum()).backward()
        opt.step()
        opt.zero_grad()
        c2 = cast_params([a, b], torch.bfloat16)
        assert c2 is c1  # refreshed in place
        torch.testing.assert_close(c2, torch.cat([a, b]).detach().bfloat16())
        torch.testing.assert_close(cast_params([b], torch.bfloat16, 2.0), (b * 2.0).detach().bfloat16())
        torch.testing.assert_close(cast_params([a, b], torch.bfloat16, (0.5, 3.0)),
                                   torch.cat([a * 0.5, b * 3.0]).detach().bfloat16())
        torch.testing.assert_close(cast_params([a], torch.bfloat16), a.detach().bfloat16())
    assert casts == [] and cast_params([b], torch.bfloat16, 2.0) is scaled
    n_live = len(kernels._LIVE)
    for _ in range(3):  # a parameter whose storage moves (FSDP re-gathers it) is recast, not listed again
        with torch.no_grad():
            b.data = b.data.clone()
        opt.step()
        torch.testing.assert_close(cast_params([b], torch.bfloat16, 2.0), (b * 2.0).detach().bfloat16())
    assert len(kernels._LIVE) == n_live
    with torch.no_grad():
        b.add_(1.0)
    torch.testing.assert_close(cast_params([a, b], torch.bfloat16), torch.cat([a, b]).detach().bfloat16())
    plain = torch.randn(3, 3)
    assert cast_params([plain], torch.bfloat16) is not cast_params([plain], torch.bfloat16)
    assert cast_params([a], torch.float32) is a


def test_cached_block_diag_is_refreshed_in_place_and_holds_nothing_alive():
    """The adapters' block-diagonal B (the K-concat QLoRA GEMM) is built once, then refreshed in place
    with the other cached copies after each optimizer step (no torch.block_diag per step), is rebuilt
    when a B moves to other storage, and the refresh plan kept between steps holds no parameter or
    copy of a deleted model alive."""
    import gc
    import weakref

    import tunery.kernels as kernels
    from tunery.kernels import cached_block_diag, cast_params

    torch.manual_seed(0)
    bs = [nn.Parameter(torch.randn(o, r)) for o, r in ((6, 2), (3, 2), (3, 1))]
    a = nn.Parameter(torch.randn(5, 4))
    first = cached_block_diag(bs, torch.bfloat16)
    torch.testing.assert_close(first, torch.block_diag(*bs).detach().bfloat16())
    assert cached_block_diag(bs, torch.bfloat16) is first
    scaled = cast_params([a], torch.bfloat16, 2.0)
    opt = torch.optim.AdamW([*bs, a], lr=0.1)
    built = []
    orig = torch.block_diag
    kernels.torch.block_diag = lambda *t: built.append(1) or orig(*t)  # (the checks below call orig)
    try:
        for _ in range(3):
            (sum(b.sum() for b in bs) + a.sum()).backward()
            opt.step()
            opt.zero_grad()
            again = cached_block_diag(bs, torch.bfloat16)
            assert again is first and built == []
            torch.testing.assert_close(again, orig(*bs).detach().bfloat16())
            torch.testing.assert_close(cast_params([a], torch.bfloat16, 2.0), (a * 2.0).detach().bfloat16())
        with torch.no_grad():
            bs[1].data = bs[1].data * 3  # moved: built again, at its new values
        opt.step()
        torch.testing.assert_close(cached_block_diag(bs, torch.bfloat16), orig(*bs).detach().bfloat16())
        assert built == [1]
        opt.step()  # the plan is made again without the replaced entry, then refreshes the new one
        torch.testing.assert_close(cached_block_diag(bs, torch.bfloat16), orig(*bs).detach().bfloat16())
        assert scaled is cast_params([a], torch.bfloat16, 2.0)
    finally:
        kernels.torch.block_diag = orig
    gone = [weakref.ref(t) for t in (*bs, a, first, scaled)]
    del bs, a, first, scaled, again, opt
    gc.collect()
    assert all(r() is None for r in gone)
    kernels._refresh_all()  # a plan naming dead entries is dropped and made again
    assert all(ref() is not None for ref, _ in kernels._LIVE)


def test_backend_choice_and_switch():
    x = torch.randn(4, 2, 8)
    assert pick_backend(x, None, None) == "sdpa"
    assert not use_triton_for(x)
    assert kernels_enabled()
    try:
        set_kernels_enabled(False)
        assert not use_triton_for(x) and not kernels_enabled()
    finally:
        set_kernels_enabled(True)

