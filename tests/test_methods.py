"""Preference / reward methods: each loss against its paper's formula, on hand-made tensors and on a tiny model
whose sequence log-probs are recomputed the slow way (one sequence at a time, full logits)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunery.adapters import adapter_state, inject_lora, lora_layers
from tunery.data.collate import collate_kto, collate_preference, collate_sft
from tunery.methods.dpo import DPO, dpo_losses
from tunery.methods.kto import KTO, kto_losses
from tunery.methods.orpo import ORPO, odds_ratio_terms
from tunery.methods.prm import ProcessRewardModel
from tunery.methods.reference import Reference, build_reference
from tunery.methods.rm import RewardModel, reward_pair_losses
from tunery.methods.simpo import SimPO, simpo_losses

V = 128


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is faster, and much faster on a busy machine (no spinning OpenMP workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ls(x: float) -> float:  # log sigmoid
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------------------------------------------------------
# formulas on hand-made tensors


def test_dpo_formulas_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    beta, eps = 0.5, 0.2
    h = [(-10 + 11) - (-12 + 11.5), (-4 + 5) - (-3 + 2)]  # [1.5, 2.0]
    sig = dpo_losses(pc, pr, rc, rr, beta)
    assert torch.allclose(sig, torch.tensor([-ls(beta * x) for x in h]), atol=1e-6)
    cdpo = dpo_losses(pc, pr, rc, rr, beta, "sigmoid", eps)
    assert torch.allclose(cdpo, torch.tensor([-(1 - eps) * ls(beta * x) - eps * ls(-beta * x) for x in h]), atol=1e-6)
    hinge = dpo_losses(pc, pr, rc, rr, beta, "hinge")
    assert torch.allclose(hinge, torch.tensor([max(0.0, 1 - beta * x) for x in h]), atol=1e-6)
    rob = dpo_losses(pc, pr, rc, rr, beta, "robust", eps)
    want = [((1 - eps) * -ls(beta * x) - eps * -ls(-beta * x)) / (1 - 2 * eps) for x in h]
    assert torch.allclose(rob, torch.tensor(want), atol=1e-6)
    lc, lr = torch.tensor([4.0, 2.0]), torch.tensor([5.0, 1.0])
    ipo = dpo_losses(pc, pr, rc, rr, beta, "ipo", chosen_lengths=lc, rejected_lengths=lr)
    hi = [1 / 4 - (-0.5) / 5, 1 / 2 - (-1) / 1]
    assert torch.allclose(ipo, torch.tensor([(x - 1 / (2 * beta)) ** 2 for x in hi]), atol=1e-6)
    with pytest.raises(ValueError, match="dpo_loss_type"):
        dpo_losses(pc, pr, rc, rr, beta, "nope")


def test_kto_formula_by_hand():
    logps, ref = torch.tensor([-3.0, -7.0, -2.0]), torch.tensor([-4.0, -6.0, -2.5])
    desirable = torch.tensor([True, False, False])
    z, beta, wd, wu = torch.tensor(0.3), 0.5, 1.0, 1.5
    out = kto_losses(logps, ref, desirable, z, beta, wd, wu)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [wd * (1 - sig(beta * (1.0 - 0.3))), wu * (1 - sig(beta * (0.3 - (-1.0)))), wu * (1 - sig(beta * (0.3 - 0.5)))]
    assert torch.allclose(out, torch.tensor(want), atol=1e-6)


def test_orpo_odds_ratio_by_hand():
    c, r = torch.tensor([-0.3, -2.0, -1e-3]), torch.tensor([-1.2, -0.9, -5.0])
    ratio, log_odds = odds_ratio_terms(c, r)
    odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
    want = [math.log(odds(a) / odds(b)) for a, b in zip(c.tolist(), r.tolist())]
    assert torch.allclose(log_odds, torch.tensor(want), atol=1e-5)
    assert torch.allclose(ratio, torch.tensor([ls(x) for x in want]), atol=1e-6)


def test_simpo_and_rm_formulas_by_hand():
    c, r = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    out = simpo_losses(c, r, beta=2.0, gamma=0.5)
    assert torch.allclose(out, torch.tensor([-ls(2.0 * 0.5 - 0.5), -ls(2.0 * -1.0 - 0.5)]), atol=1e-6)
    out = simpo_losses(c, r, beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert torch.allclose(out[0], torch.tensor(-0.9 * ls(0.5) - 0.1 * ls(-0.5)), atol=1e-6)
    rc, rr, m = torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.5]), torch.tensor([0.5, 0.0])
    assert torch.allclose(reward_pair_losses(rc, rr), torch.tensor([-ls(0.8), -ls(-1.0)]), atol=1e-6)
    assert torch.allclose(reward_pair_losses(rc, rr, m, 0.01),
                          torch.tensor([-ls(0.3) + 0.01 * 1.44, -ls(-1.0) + 0.01 * 0.0]), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# a tiny model, and the slow way of computing what the methods compute


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig

    from tunery.models import build_own

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return build_own(cfg, torch.float32)


def slow_logps(model, ids: list[int], labels: list[int]) -> tuple[torch.Tensor, int]:
    """Sum of log p(labels[t+1] | ids[:t+1]) over trained positions: one sequence, full logits."""
    h = model(torch.tensor([ids]))
    logp = model.logits(h)[0].log_softmax(-1)
    total, n = logp.new_zeros(()), 0
    for t in range(len(ids) - 1):
        if labels[t + 1] != -100:
            total = total + logp[t, labels[t + 1]]
            n += 1
    return total, n


def rand_ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, V, (n,), generator=g).tolist()


def pref_rows(seed: int = 0, n: int = 3, train_prompt: bool = False):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p, c, r = rand_ids(g, 3 + i), rand_ids(g, 2 + (i * 3) % 5), rand_ids(g, 4 - i % 3)
        lab = p if train_prompt else [-100] * len(p)
        rows.append({"chosen_input_ids": p + c, "chosen_labels": lab + c,
                     "rejected_input_ids": p + r, "rejected_labels": lab + r})
    return rows


def slow_pair_logps(model, rows):
    c = [slow_logps(model, r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
    r = [slow_logps(model, x["rejected_input_ids"], x["rejected_labels"]) for x in rows]
    return (torch.stack([x for x, _ in c]), torch.tensor([float(n) for _, n in c]),
            torch.stack([x for x, _ in r]), torch.tensor([float(n) for _, n in r]))


def lora_model(seed: int = 0, nonzero: bool = True):
    m = tiny_model(seed)
    base = copy.deepcopy(m)
    inject_lora(m, ["q_proj", "v_proj", "down_proj"], 4, 8)
    return m, base


def perturb_lora(m, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(m).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


# ---------------------------------------------------------------------------------------------------------------
# DPO


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0),
                                           ("robust", 0.2)])
def test_dpo_loss_matches_slow_logps(loss_type, eps):
    m, base = lora_model()
    dpo = DPO(beta=0.3, loss_type=loss_type, label_smoothing=eps)
    assert dpo.setup(m)["reference"] == "adapter_off"
    perturb_lora(m)  # the policy moved away from the base
    rows = pref_rows()
    loss, metrics = dpo.loss(m, collate_preference(rows), 3)
    with torch.no_grad():
        pc, nc, pr, nr = slow_pair_logps(m, rows)
        rc, _, rr, _ = slow_pair_logps(base, rows)
    want = dpo_losses(pc, pr, rc, rr, 0.3, loss_type, eps, nc, nr).mean()
    assert torch.allclose(loss, want, atol=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(float((0.3 * (pc - rc)).mean()), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(float((0.3 * (pc - rc - pr + rr)).mean()), abs=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx(float(((pc - rc) > (pr - rr)).float().mean()))
    assert metrics["logps/chosen"] == pytest.approx(float(pc.mean()), abs=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(float(pr.mean()), abs=1e-5)


def test_dpo_rpo_term_and_gradients():
    m, base = lora_model()
    rows = pref_rows(seed=3)
    dpo = DPO(beta=0.1, rpo_alpha=0.7)
    assert dpo.setup(m)["reference"] == "adapter_off"
    perturb_lora(m)
    loss, metrics = dpo.loss(m, collate_preference(rows), 3)
    loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    pc, nc, pr, _ = slow_pair_logps(m, rows)
    with torch.no_grad():
        rc, _, rr, _ = slow_pair_logps(base, rows)
    nll = -pc.sum() / nc.sum()
    want = dpo_losses(pc, pr, rc, rr, 0.1).mean() + 0.7 * nll
    want.backward()
    assert torch.allclose(loss, want, atol=1e-5)
    assert metrics["nll_loss"] == pytest.approx(float(nll.detach()), abs=1e-5)
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[n], p.grad, atol=1e-5), n


def test_dpo_accumulation_sums_to_the_whole_batch():
    m, _ = lora_model()
    rows = pref_rows(seed=5, n=4)
    dpo = DPO(beta=0.2)
    dpo.setup(m)
    perturb_lora(m)
    whole, _ = dpo.loss(m, collate_preference(rows), 4)
    parts = sum(dpo.loss(m, collate_preference(rows[i : i + 2]), 4)[0] for i in (0, 2))
    assert torch.allclose(whole, parts, atol=1e-6)


def test_reference_adapter_off_equals_base():
    m, base = lora_model()
    ref = build_reference(m)
    assert ref.mode == "adapter_off"
    perturb_lora(m)
    rows = pref_rows(seed=7)
    batch = collate_preference(rows)
    dpo = DPO()
    dpo.reference = ref
    with torch.no_grad():
        rc, rr = dpo.reference_logps(m, batch)
        bc, _, br, _ = slow_pair_logps(base, rows)
        pc, _, _, _ = slow_pair_logps(m, rows)
    assert torch.allclose(rc, bc, atol=1e-5) and torch.allclose(rr, br, atol=1e-5)
    assert not torch.allclose(rc, pc, atol=1e-3)  # the adapter does change the policy
    assert all(layer.enabled for layer in lora_layers(m).values())  # switched back on


def test_reference_snapshot_keeps_the_starting_adapter():
    m, _ = lora_model()
    perturb_lora(m, seed=2)  # e.g. lora_model_dir: the adapter does not start at zero
    start = copy.deepcopy(m)
    ref = build_reference(m)
    assert ref.mode == "snapshot"
    perturb_lora(m, seed=3)
    now = {n: p.detach().clone() for n, p in m.named_parameters()}
    rows = pref_rows(seed=8)
    dpo = DPO()
    dpo.reference = ref
    with torch.no_grad():
        rc, _ = dpo.reference_logps(m, collate_preference(rows))
        sc, _, _, _ = slow_pair_logps(start, rows)
    assert torch.allclose(rc, sc, atol=1e-5)
    assert all(torch.equal(now[n], p) for n, p in m.named_parameters())  # restored


def test_reference_full_finetune_is_a_frozen_copy():
    m = tiny_model()
    start = copy.deepcopy(m)
    dpo = DPO()
    assert dpo.setup(m)["reference"] == "copy"
    assert all(not p.requires_grad for p in dpo.reference.frozen.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    rows = pref_rows(seed=9)
    dpo.loss(m, collate_preference(rows), 3)[0].backward()
    opt.step()
    with torch.no_grad():
        rc, _ = dpo.reference_logps(m, collate_preference(rows))
        sc, _, _, _ = slow_pair_logps(start, rows)
    assert torch.allclose(rc, sc, atol=1e-5)


def test_precomputed_reference_is_cached_and_used(tmp_path, monkeypatch):
    from tunery.data.types import PreparedData

    monkeypatch.setenv("TUNERY_CACHE", str(tmp_path))
    m = tiny_model()
    rows, ev = pref_rows(seed=11, n=5), pref_rows(seed=12, n=2)
    data = PreparedData(train=copy.deepcopy(rows), eval=copy.deepcopy(ev), fingerprint="abc", kind="preference")
    dpo = DPO(beta=0.1, precompute_ref_log_probs=True)
    info = dpo.setup(m, SimpleNamespace(micro_batch_size=2, eval_batch_size=None), data)
    assert info == {"cached": False, "rows": 7}
    assert len(list((tmp_path / "ref_logps").glob("*.json"))) == 2
    with torch.no_grad():
        bc, _, br, _ = slow_pair_logps(m, rows)
    got = torch.tensor([r["ref_chosen_logps"] for r in data.train])
    assert torch.allclose(got, bc, atol=1e-5)
    assert "ref_rejected_logps" in data.eval[0]
    # a second run reads the cache; the batch carries the values and no reference forward runs
    data2 = PreparedData(train=copy.deepcopy(rows), eval=None, fingerprint="abc", kind="preference")
    assert DPO(precompute_ref_log_probs=True).setup(m, SimpleNamespace(micro_batch_size=2), data2)["cached"]
    batch = collate_preference(data.train[:3])
    assert "ref_chosen_logps" in batch
    live = DPO(beta=0.1)
    live.setup(copy.deepcopy(m))
    a, _ = dpo.loss(m, batch, 3)
    b, _ = live.loss(m, collate_preference(rows[:3]), 3)  # rows without ref fields: live frozen-copy reference
    assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# KTO


def kto_rows(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p, c = rand_ids(g, 3 + i % 2), rand_ids(g, 2 + i)
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c, "prompt_len": len(p), "kto_label": i % 3 != 1})
    return rows


def test_kto_loss_matches_slow_logps_and_kl():
    m, base = lora_model()
    rows = kto_rows()
    kto = KTO(beta=0.2, desirable_weight=1.0, undesirable_weight=1.3)
    assert kto.setup(m)["reference"] == "adapter_off"
    perturb_lora(m, seed=4)
    loss, metrics = kto.loss(m, collate_kto(rows), 4)
    loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    n = len(rows)
    kl_pairs = []
    for i, r in enumerate(rows):
        o = rows[(i + 1) % n]
        kl_pairs.append((r["input_ids"][: r["prompt_len"]] + o["input_ids"][o["prompt_len"]:],
                         [-100] * r["prompt_len"] + o["labels"][o["prompt_len"]:]))
    with torch.no_grad():
        ref = torch.stack([slow_logps(base, r["input_ids"], r["labels"])[0] for r in rows])
        kl = torch.stack([slow_logps(m, x, y)[0] - slow_logps(base, x, y)[0] for x, y in kl_pairs]).mean().clamp(min=0)
    pol = torch.stack([slow_logps(m, r["input_ids"], r["labels"])[0] for r in rows])
    des = torch.tensor([r["kto_label"] for r in rows])
    want = kto_losses(pol, ref, des, kl, 0.2, 1.0, 1.3).mean()
    want.backward()
    assert torch.allclose(loss, want, atol=1e-5)
    assert metrics["kl"] == pytest.approx(float(kl), abs=1e-5)
    pol = pol.detach()
    assert metrics["rewards/chosen"] == pytest.approx(float(0.2 * (pol - ref)[des].mean()), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(float(0.2 * (pol - ref)[~des].mean()), abs=1e-5)
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[name], p.grad, atol=1e-5), name


def test_kto_precompute_fixes_partners(tmp_path, monkeypatch):
    from tunery.data.types import PreparedData

    monkeypatch.setenv("TUNERY_CACHE", str(tmp_path))
    m = tiny_model()
    rows = kto_rows(seed=2, n=5)
    data = PreparedData(train=rows, eval=None, fingerprint="k1", kind="kto")
    KTO(precompute_ref_log_probs=True).setup(m, SimpleNamespace(micro_batch_size=2), data)
    r0, r1 = rows[0], rows[1]
    assert r0["kl_input_ids"] == r0["input_ids"][: r0["prompt_len"]] + r1["input_ids"][r1["prompt_len"]:]
    with torch.no_grad():
        want = slow_logps(m, r0["kl_input_ids"], r0["kl_labels"])[0]
    assert r0["ref_kl_logps"] == pytest.approx(float(want), abs=1e-5)


def test_kto_precomputed_reference_matches_the_live_one(tmp_path, monkeypatch):
    from tunery.data.types import PreparedData

    monkeypatch.setenv("TUNERY_CACHE", str(tmp_path))
    m, _ = lora_model()
    rows = kto_rows(seed=6, n=4)
    data = PreparedData(train=copy.deepcopy(rows), eval=None, fingerprint="k2", kind="kto")
    pre = KTO(beta=0.2, precompute_ref_log_probs=True)
    pre.setup(m, SimpleNamespace(micro_batch_size=4), data)
    live = KTO(beta=0.2)
    live.setup(m)
    perturb_lora(m, seed=5)
    got, gm = pre.loss(m, collate_kto(data.train), 4)
    # the live reference on the same (fixed-partner) KL sequences
    want, wm = live.loss(m, collate_kto([{k: v for k, v in r.items() if not k.startswith("ref_")} for r in data.train]), 4)
    assert torch.allclose(got, want, atol=1e-5) and gm["kl"] == pytest.approx(wm["kl"], abs=1e-5)


def test_kto_needs_two_rows_per_micro_batch():
    from tunery.config import Config

    with pytest.raises(ValueError, match="micro_batch_size"):
        KTO.from_config(Config(rl="kto", micro_batch_size=1))


# ---------------------------------------------------------------------------------------------------------------
# ORPO, SimPO


def test_orpo_loss_matches_slow_logps():
    m = tiny_model(seed=1)
    rows = pref_rows(seed=13)
    loss, metrics = ORPO(alpha=0.25).loss(m, collate_preference(rows), 3)
    with torch.no_grad():
        pc, nc, pr, nr = slow_pair_logps(m, rows)
    nll = -pc.sum() / nc.sum()
    ratio, _ = odds_ratio_terms(pc / nc, pr / nr)
    want = nll - 0.25 * ratio.mean()
    assert torch.allclose(loss, want, atol=1e-5)
    assert metrics["nll_loss"] == pytest.approx(float(nll), abs=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(float((pc / nc).mean()), abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(float(0.25 * (pc / nc).mean()), abs=1e-5)


def test_simpo_loss_matches_slow_logps():
    m = tiny_model(seed=2)
    rows = pref_rows(seed=14)
    loss, metrics = SimPO(beta=2.5, gamma=1.2).loss(m, collate_preference(rows), 3)
    with torch.no_grad():
        pc, nc, pr, nr = slow_pair_logps(m, rows)
    want = simpo_losses(pc / nc, pr / nr, 2.5, 1.2).mean()
    assert torch.allclose(loss, want, atol=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(float((2.5 * (pc / nc - pr / nr)).mean()), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# reward models


def test_reward_model_scores_the_last_token_and_trains_the_head():
    m, _ = lora_model()
    rm = RewardModel(center_coefficient=0.01, seed=3)
    rm.setup(m)
    assert m.score.weight.requires_grad and m.score.weight.shape == (1, 32) and m.score.bias is None
    rows = pref_rows(seed=15)
    for i, r in enumerate(rows):
        r["margin"] = 0.5 * i
    loss, metrics = rm.loss(m, collate_preference(rows), 3)
    loss.backward()
    assert m.score.weight.grad is not None and m.score.weight.grad.abs().sum() > 0

    def score(ids):
        with torch.no_grad():
            return (m(torch.tensor([ids]))[0, -1] @ m.score.weight[0]).item()

    c = torch.tensor([score(r["chosen_input_ids"]) for r in rows])
    r_ = torch.tensor([score(r["rejected_input_ids"]) for r in rows])
    want = reward_pair_losses(c, r_, torch.tensor([0.0, 0.5, 1.0]), 0.01).mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((c > r_).float().mean()))
    assert "base_model.model.score.weight" in adapter_state(m, list(rm.modules_to_save))


def test_reward_model_head_is_seeded():
    a, b = tiny_model(), tiny_model()
    RewardModel(seed=5).setup(a)
    RewardModel(seed=5).setup(b)
    assert torch.equal(a.score.weight, b.score.weight)


def test_process_reward_model_classifies_separators():
    m = tiny_model(seed=4)
    prm = ProcessRewardModel(seed=1)
    prm.setup(m)
    assert m.score.weight.shape == (2, 32) and m.score.bias is not None
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (9, 7):
        ids = rand_ids(g, n)
        labels = [-100] * n
        labels[3], labels[n - 1] = 1, 0
        rows.append({"input_ids": ids, "labels": labels})
    batch = collate_sft(rows)
    assert prm.count(batch) == 4
    loss, metrics = prm.loss(m, batch, 4)
    with torch.no_grad():
        logits, ys = [], []
        for r in rows:
            h = m(torch.tensor([r["input_ids"]]))[0]
            for t, y in enumerate(r["labels"]):
                if y != -100:
                    logits.append(m.score(h[t]))
                    ys.append(y)
    want = F.cross_entropy(torch.stack(logits), torch.tensor(ys))
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    acc = (torch.stack(logits).argmax(-1) == torch.tensor(ys)).float().mean()
    assert metrics["accuracy"] == pytest.approx(float(acc))
    bad = collate_sft([{"input_ids": [1, 2, 3], "labels": [-100, 5, -100]}])
    with pytest.raises(ValueError, match="0 \\(wrong\\) or 1"):
        prm.loss(m, bad, 1)


# ---------------------------------------------------------------------------------------------------------------
# registry


@pytest.mark.parametrize("rl,cls", [("dpo", DPO), ("kto", KTO), ("orpo", ORPO), ("simpo", SimPO),
                                    ("rm", RewardModel), ("prm", ProcessRewardModel)])
def test_registry_builds_each_method(rl, cls):
    from tunery.config import Config
    from tunery.methods import build_method

    cfg = Config(rl=rl, rl_beta=0.2, micro_batch_size=2, dpo_loss_type="ipo", orpo_alpha=0.3, simpo_gamma=0.7,
                 rm_center_rewards_coefficient=0.01)
    method = build_method(cfg)
    assert isinstance(method, cls) and method.name == rl
    assert method.data_kind == {"kto": "kto", "prm": "prm"}.get(rl, "preference")
    if rl == "dpo":
        assert (method.beta, method.loss_type) == (0.2, "ipo")
    if rl == "simpo":
        assert (method.beta, method.gamma) == (0.2, 0.7)


def test_reference_modes_are_named():
    assert Reference("precomputed").mode == "precomputed"
    with pytest.raises(RuntimeError, match="precomputed"):
        with Reference("precomputed").use(tiny_model()):
            pass


# ---------------------------------------------------------------------------------------------------------------
# GPU: the fused decoder path honours the adapter switch (run: pytest tests/test_methods.py -m gpu)


@pytest.mark.gpu
def test_adapter_off_reference_on_the_fused_gpu_path():
    from tunery.methods.sequences import forward_hidden, sequence_logps
    from tunery.models.decoder import set_fused as set_blocks_fused
    from tunery.models.fused import set_fused

    m, base = lora_model()
    dpo = DPO(beta=0.1)
    assert dpo.setup(m)["reference"] == "adapter_off"
    perturb_lora(m)
    m, base = m.cuda(), base.cuda()
    set_fused(m, True)
    set_fused(base, True)
    rows = pref_rows(seed=21, n=4)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in collate_preference(rows).items()}
    with torch.no_grad():
        rc, rr = dpo.reference_logps(m, batch)
        s = sequence_logps(base, forward_hidden(base, batch), batch, 8).sums
        pol = sequence_logps(m, forward_hidden(m, batch), batch, 8).sums
    assert torch.allclose(torch.cat([rc, rr]), s, atol=2e-3)
    assert not torch.allclose(pol, s, atol=1e-2)
    loss, metrics = dpo.loss(m, batch, 4)
    loss.backward()
    cpu_m = copy.deepcopy(m).cpu()
    set_blocks_fused(cpu_m, False)  # blocks only: the process-wide kernel switch stays on
    cpu_loss, _ = dpo.loss(cpu_m, collate_preference(rows), 4)
    assert abs(loss.item() - cpu_loss.item()) < 2e-3
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)
