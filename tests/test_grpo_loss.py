"""GRPO loss and advantages: hand-computed values, and trl's GRPOTrainer._compute_loss on the same tensors."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunery.methods.grpo import StepTotals, completion_logps, group_advantages, policy_loss, rollout_batch


def _tensors(seed: int = 0, s: int = 6, length: int = 7, off_policy: bool = True):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(s, length, generator=g) * 3).requires_grad_(True)
    old = (logps.detach() + 0.3 * torch.randn(s, length, generator=g)) if off_policy else None
    ref = logps.detach() + 0.2 * torch.randn(s, length, generator=g)
    lens = torch.randint(1, length + 1, (s,), generator=g)
    lens[0] = length
    mask = (torch.arange(length)[None, :] < lens[:, None]).float()
    adv = torch.randn(s, generator=g)
    return logps, old, ref, mask, adv


# ---- hand-computed ------------------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 4.0, 0.0])
    adv, std = group_advantages(r, 4, "group")
    g1 = [1.0, 0, 0, 0]
    m1 = 0.25
    s1 = math.sqrt(sum((x - m1) ** 2 for x in g1) / 3)  # unbiased
    assert adv[0].item() == pytest.approx((1 - m1) / (s1 + 1e-4), rel=1e-6)
    assert adv[1].item() == pytest.approx((0 - m1) / (s1 + 1e-4), rel=1e-6)
    m2, s2 = 2.0, math.sqrt((0 + 0 + 4 + 4) / 3)
    assert adv[6].item() == pytest.approx((4 - m2) / (s2 + 1e-4), rel=1e-6)
    assert std[5].item() == pytest.approx(s2, rel=1e-6)

    none, _ = group_advantages(r, 4, "none")
    assert none.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 2, -2])
    batch, _ = group_advantages(r, 4, "batch")
    assert batch[6].item() == pytest.approx(2.0 / (r.std().item() + 1e-4), rel=1e-6)
    same, _ = group_advantages(torch.ones(4), 4, "group")
    assert same.abs().max().item() == 0.0  # a group where every completion scored the same teaches nothing


def test_on_policy_loss_is_minus_mean_advantage_and_its_gradient():
    # one update per rollout: ratio 1, loss = -sum(A * mask) / tokens (dapo); d loss / d logp_t = -A / tokens
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, -4.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, sums = policy_loss(logps, adv, mask, loss_type="dapo")
    assert loss.item() == pytest.approx(-(2 * 2 + (-1) * 3) / 5)
    loss.backward()
    expected = -adv[:, None] * mask / 5
    assert torch.allclose(logps.grad, expected)
    assert sums["tokens"] == 5 and sums["clipped"] == 0

    for lt, want in [("grpo", -(2.0 + -1.0) / 2), ("bnpo", -(4 - 3) / 5), ("dr_grpo", -(4 - 3) / (2 * 10))]:
        loss, _ = policy_loss(logps, adv, mask, loss_type=lt, max_completion_length=10)
        assert loss.item() == pytest.approx(want), lt


def test_clipping_and_kl_by_hand():
    # one token per sequence: ratio e^0.5 ~ 1.65 with A > 0 is clipped at 1 + eps_high; e^-0.5 with A < 0 at 1 - eps
    logps = torch.tensor([[0.0], [0.0], [0.0]], requires_grad=True)
    old = torch.tensor([[-0.5], [0.5], [0.05]])
    adv = torch.tensor([1.0, -1.0, 1.0])
    mask = torch.ones(3, 1)
    loss, sums = policy_loss(logps, adv, mask, old_logps=old, epsilon=0.2, epsilon_high=0.28, loss_type="bnpo")
    r = torch.exp(-old[:, 0])
    per = [-min(r[0] * 1, 1.28 * 1), -min(r[1] * -1, 0.8 * -1), -min(r[2] * 1, min(r[2], 1.28) * 1)]
    assert loss.item() == pytest.approx(float(sum(per)) / 3, rel=1e-6)
    assert sums["clipped_high"] == 1 and sums["clipped_low"] == 1 and sums["clipped"] == 2
    loss.backward()
    assert logps.grad[0].item() == 0.0 and logps.grad[1].item() == 0.0  # clipped tokens carry no gradient
    assert logps.grad[2].item() == pytest.approx(-r[2].item() / 3, rel=1e-6)

    ref = torch.tensor([[-0.7], [0.2], [0.0]])
    loss_kl, sums_kl = policy_loss(logps, adv, mask, old_logps=old, ref_logps=ref, beta=0.1, epsilon=0.2,
                                   epsilon_high=0.28, loss_type="bnpo")
    d = ref[:, 0]
    k3 = torch.exp(d) - d - 1
    assert loss_kl.item() == pytest.approx(float(sum(per)) / 3 + 0.1 * k3.mean().item(), rel=1e-6)
    assert sums_kl["kl"] == pytest.approx(k3.sum().item(), rel=1e-6)


def test_sequence_level_ratio_is_gspo():
    logps = torch.tensor([[-1.0, -1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -0.9, 5.0]])  # the padded position must not count
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0])
    loss, _ = policy_loss(logps, adv, mask, old_logps=old, level="sequence", loss_type="grpo")
    w = math.exp(((-1 + 1.2) + (-1 + 0.9)) / 2)
    assert loss.item() == pytest.approx(-min(w, 1.2), rel=1e-6)


def test_step_totals_make_micro_batches_sum_to_the_whole():
    logps, old, ref, mask, adv = _tensors(1, s=8)
    for lt in ("grpo", "dapo", "dr_grpo"):
        whole, _ = policy_loss(logps, adv, mask, old_logps=old, ref_logps=ref, beta=0.04, loss_type=lt,
                               max_completion_length=7)
        totals = StepTotals(sequences=8, tokens=int(mask.sum()), micro_batches=2)
        parts = sum(policy_loss(logps[i:j], adv[i:j], mask[i:j], old_logps=old[i:j], ref_logps=ref[i:j], beta=0.04,
                                loss_type=lt, max_completion_length=7, totals=totals)[0]
                    for i, j in ((0, 3), (3, 8)))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6), lt


# ---- log-probs from a flat batch ----------------------------------------------------------------------------------

def test_completion_logps_match_full_logits():
    from tunery.models.decoder import CausalLM, DecoderConfig

    torch.manual_seed(0)
    cfg = DecoderConfig(family="llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, final_softcap=7.0)
    model = CausalLM(cfg).eval()
    seqs = [([1, 2, 3], [4, 5]), ([7, 8], [9, 10, 11, 12]), ([3], [6])]
    batch = rollout_batch(seqs)
    got = completion_logps(model, batch, temperature=0.7)
    assert got.shape == (3, 4)
    for i, (p, c) in enumerate(seqs):
        ids = torch.tensor([p + c])
        logits = model.logits(model(ids))[0] / 0.7  # softcap first, then temperature
        lp = logits.log_softmax(-1)
        want = torch.stack([lp[len(p) - 1 + t, tok] for t, tok in enumerate(c)])
        assert torch.allclose(got[i, : len(c)], want, atol=1e-5)
        assert (got[i, len(c):] == 0).all()


# ---- trl parity ---------------------------------------------------------------------------------------------------

def _trl_loss(logps, old, ref, adv, mask, *, loss_type, level, eps, eps_high, beta, max_len):
    """trl's GRPOTrainer._compute_loss, called on a minimal object that returns our log-probs."""
    trl = pytest.importorskip("trl")
    from trl import GRPOTrainer

    def get_logps(model, input_ids, attention_mask, logits_to_keep, **kw):
        return logps, torch.zeros_like(logps), None

    acc = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                          reduce=lambda x, reduction="sum": x)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=get_logps, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, accelerator=acc,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
    )
    s, length = logps.shape
    inputs = {"prompt_ids": torch.zeros(s, 2, dtype=torch.long), "prompt_mask": torch.ones(s, 2, dtype=torch.long),
              "completion_ids": torch.zeros(s, length, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    try:
        loss = GRPOTrainer._compute_loss(fake, None, inputs)
    except AttributeError as e:  # another trl release reads state this minimal object does not fake
        pytest.skip(f"trl {trl.__version__}: GRPOTrainer._compute_loss needs {e}; update the fake trainer")
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_matches_trl(loss_type, level, beta, off_policy):
    logps, old, ref, mask, adv = _tensors(3, off_policy=off_policy)
    want, trl_metrics = _trl_loss(logps, old, ref, adv, mask, loss_type=loss_type, level=level, eps=0.2,
                                  eps_high=0.28, beta=beta, max_len=7)
    (g_want,) = torch.autograd.grad(want, logps)
    got, sums = policy_loss(logps, adv, mask, old_logps=old, ref_logps=ref if beta else None, loss_type=loss_type,
                            level=level, epsilon=0.2, epsilon_high=0.28, beta=beta, max_completion_length=7)
    (g_got,) = torch.autograd.grad(got, logps)
    assert abs(got.item() - want.item()) < 1e-5
    assert torch.allclose(g_got, g_want, atol=1e-6)
    if level == "token":
        assert sums["clipped"] / sums["tokens"] == pytest.approx(trl_metrics["clip_ratio/region_mean"][-1], abs=1e-6)
    if beta:
        assert sums["kl"] / sums["tokens"] == pytest.approx(trl_metrics["kl"][-1], rel=1e-5)


def test_advantages_match_trl_formula():
    """trl: (r - group mean) / (nanstd + 1e-4), nanstd unbiased; its helper is importable."""
    pytest.importorskip("trl")
    from trl.trainer.utils import nanstd

    r = torch.tensor([0.5, 1.0, 0.0, 3.0, 1.0, 1.0, 2.0, 0.0])
    g = r.view(-1, 4)
    want = (r - g.mean(1).repeat_interleave(4)) / (nanstd(g, dim=1).repeat_interleave(4) + 1e-4)
    got, _ = group_advantages(r, 4, "group")
    assert torch.allclose(got, want, atol=1e-6)
    want_b = (r - g.mean(1).repeat_interleave(4)) / (nanstd(r) + 1e-4)
    got_b, _ = group_advantages(r, 4, "batch")
    assert torch.allclose(got_b, want_b, atol=1e-6)
