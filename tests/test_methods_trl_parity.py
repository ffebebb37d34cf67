"""Each method's loss equals trl's on the same small batch (within 1e-5).

trl runs a transformers Llama on padded batches (its own collators and loss code, called on minimal trainer
objects); Tunery runs its own decoder, with the same weights, on the flat padding-free batch. Skipped when trl is not
installed (test-only dependency).
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tunery.data.collate import collate_kto, collate_preference  # noqa: E402
from tunery.methods.dpo import DPO  # noqa: E402
from tunery.methods.kto import KTO  # noqa: E402
from tunery.methods.orpo import ORPO  # noqa: E402
from tunery.methods.reference import Reference  # noqa: E402
from tunery.methods.rm import RewardModel  # noqa: E402
from tunery.methods.simpo import SimPO  # noqa: E402
from tunery.models import build_own  # noqa: E402

V, PAD = 96, 0
TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is faster, and much faster on a busy machine (no spinning OpenMP workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, pad_token_id=PAD, tie_word_embeddings=False, **kw)


def hf_pair(seed: int):
    """(HF policy, HF reference, own policy, own reference) — own ones carry the HF weights."""
    torch.manual_seed(seed)
    pol = LlamaForCausalLM(hf_config()).eval()
    ref = LlamaForCausalLM(hf_config()).eval()
    own = build_own(hf_config(), torch.float32, state={k: v.clone() for k, v in pol.state_dict().items()})
    own_ref = build_own(hf_config(), torch.float32, state={k: v.clone() for k, v in ref.state_dict().items()})
    return pol, ref, own, own_ref


class FakeAccelerator:
    device = torch.device("cpu")

    def unwrap_model(self, m):
        return m

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def autocast(self):
        return contextlib.nullcontext()


def trainer_stub(cls, model, **attrs):
    t = object.__new__(cls)
    t.accelerator = FakeAccelerator()
    t.model = model
    t.args = SimpleNamespace(gradient_checkpointing_kwargs=None, center_rewards_coefficient=None)
    t.aux_loss_enabled = False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._total_train_tokens = 0
    t._tp_size = 1
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


def examples(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(1, V, (k,), generator=g).tolist()  # noqa: E731 (no pad id inside sequences)
    return [{"prompt_ids": ids(2 + i), "chosen_ids": ids(2 + (3 * i) % 5), "rejected_ids": ids(5 - i % 3)}
            for i in range(n)]


def own_pref_rows(ex, train_prompt: bool = False):
    rows = []
    for e in ex:
        lab = e["prompt_ids"] if train_prompt else [-100] * len(e["prompt_ids"])
        rows.append({"chosen_input_ids": e["prompt_ids"] + e["chosen_ids"], "chosen_labels": lab + e["chosen_ids"],
                     "rejected_input_ids": e["prompt_ids"] + e["rejected_ids"],
                     "rejected_labels": lab + e["rejected_ids"]})
    return rows


def last(metrics, key):
    """The value trl logged last (under "eval": the stub models are in eval mode, so dropout is off)."""
    return metrics["eval"][key][-1]


# ---------------------------------------------------------------------------------------------------------------
# DPO: trl.DPOTrainer._compute_loss (its fused-LM-head forward, padded batches, separate reference model)


@pytest.mark.parametrize("loss_type,eps,rpo", [("sigmoid", 0.0, None), ("ipo", 0.0, None), ("hinge", 0.0, None),
                                               ("robust", 0.2, None), ("sigmoid", 0.0, 0.5)])
def test_dpo_matches_trl(loss_type, eps, rpo):
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    pol, ref, own, own_ref = hf_pair(seed=1)
    for m in (pol, ref):
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    types, weights = [loss_type], [1.0]
    if rpo:
        types, weights = [loss_type, "sft"], [1.0, rpo]
    beta = 0.3
    t = trainer_stub(DPOTrainer, pol, ref_model=ref, precompute_ref_logps=False, ld_alpha=None,
                     f_divergence_type="reverse_kl", loss_types=types, loss_weights=weights, beta=beta,
                     label_smoothing=eps, use_weighting=False)
    ex = examples(seed=2)
    want = t._compute_loss(pol, DataCollatorForPreference(pad_token_id=PAD)(ex), return_outputs=False)

    dpo = DPO(beta=beta, loss_type=loss_type, label_smoothing=eps, rpo_alpha=rpo)
    dpo.reference = Reference("copy", frozen=own_ref)
    got, metrics = dpo.loss(own, collate_preference(own_pref_rows(ex)), len(ex))
    assert abs(got.item() - want.item()) < TOL
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert metrics[key] == pytest.approx(last(t._metrics, key), abs=TOL), key

    if loss_type == "sigmoid":  # gradients too: the HF and own decoders share parameter names
        want.backward()
        got.backward()
        own_grads = dict(own.named_parameters())
        for name, p in pol.named_parameters():
            assert torch.allclose(p.grad, own_grads[name].grad, atol=1e-5), name


# ---------------------------------------------------------------------------------------------------------------
# KTO: trl.KTOTrainer._compute_loss with KL completions cycled by +1, as collate_kto does


def test_kto_matches_trl():
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    pol, ref, own, own_ref = hf_pair(seed=3)
    for m in (pol, ref):
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    t = trainer_stub(KTOTrainer, pol, ref_model=ref, precompute_ref_logps=False, calculate_KL=True,
                     loss_type="kto", beta=0.2, desirable_weight=1.0, undesirable_weight=1.4)
    g = torch.Generator().manual_seed(4)
    ids = lambda k: torch.randint(1, V, (k,), generator=g).tolist()  # noqa: E731
    ex = [{"prompt_ids": ids(2 + i % 3), "completion_ids": ids(3 + i), "label": i % 3 != 1} for i in range(5)]
    n = len(ex)
    for i, e in enumerate(ex):
        e["KL_completion_ids"] = ex[(i + 1) % n]["completion_ids"]
    want = t._compute_loss(pol, DataCollatorForUnpairedPreference(pad_token_id=PAD)(ex), return_outputs=False)

    rows = [{"input_ids": e["prompt_ids"] + e["completion_ids"], "prompt_len": len(e["prompt_ids"]),
             "labels": [-100] * len(e["prompt_ids"]) + e["completion_ids"], "kto_label": e["label"]} for e in ex]
    kto = KTO(beta=0.2, desirable_weight=1.0, undesirable_weight=1.4)
    kto.reference = Reference("copy", frozen=own_ref)
    got, metrics = kto.loss(own, collate_kto(rows), n)
    assert abs(got.item() - want.item()) < TOL
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[key] == pytest.approx(last(t._metrics, key), abs=TOL), key


# ---------------------------------------------------------------------------------------------------------------
# ORPO and SimPO: trl.experimental ORPOTrainer / CPOTrainer(loss_type="simpo").get_batch_loss_metrics


def padded_pair_batch(ex, train_prompt: bool):
    from torch.nn.utils.rnn import pad_sequence

    out = {}
    for side in ("chosen", "rejected"):
        seqs = [torch.tensor(e["prompt_ids"] + e[f"{side}_ids"]) for e in ex]
        labs = [torch.tensor((e["prompt_ids"] if train_prompt else [-100] * len(e["prompt_ids"])) + e[f"{side}_ids"])
                for e in ex]
        out[f"{side}_input_ids"] = pad_sequence(seqs, batch_first=True, padding_value=PAD)
        out[f"{side}_attention_mask"] = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
        out[f"{side}_labels"] = pad_sequence(labs, batch_first=True, padding_value=-100)
    return out


def test_orpo_matches_trl():
    from trl.experimental.orpo import ORPOTrainer

    pol, _, own, _ = hf_pair(seed=5)
    t = trainer_stub(ORPOTrainer, pol, beta=0.25, is_encoder_decoder=False, padding_value=PAD)
    ex = examples(seed=6)
    # trl's ORPO NLL counts the prompt tokens too; Tunery trains what the labels mark. With the prompt trained
    # (train_on_inputs) both sides sum the same tokens, so the whole loss can be compared.
    want, want_m = t.get_batch_loss_metrics(pol, padded_pair_batch(ex, train_prompt=True))
    got, metrics = ORPO(alpha=0.25).loss(own, collate_preference(own_pref_rows(ex, train_prompt=True)), len(ex))
    assert abs(got.item() - want.item()) < TOL
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[key] == pytest.approx(want_m[key], abs=TOL), key


def test_simpo_matches_trl():
    from trl.experimental.cpo import CPOTrainer

    pol, _, own, _ = hf_pair(seed=7)
    t = trainer_stub(CPOTrainer, pol, beta=2.5, simpo_gamma=1.3, loss_type="simpo", label_smoothing=0.1, alpha=0.0,
                     cpo_alpha=0.0, is_encoder_decoder=False, pad_token_id=PAD)
    ex = examples(seed=8)
    want, want_m = t.get_batch_loss_metrics(pol, padded_pair_batch(ex, train_prompt=False))
    got, metrics = SimPO(beta=2.5, gamma=1.3, label_smoothing=0.1).loss(
        own, collate_preference(own_pref_rows(ex)), len(ex))
    assert abs(got.item() - want.item()) < TOL
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert metrics[key] == pytest.approx(want_m[key], abs=TOL), key


# ---------------------------------------------------------------------------------------------------------------
# Reward model: trl.RewardTrainer.compute_loss on transformers' LlamaForSequenceClassification


@pytest.mark.parametrize("margin,center", [(False, None), (True, 0.01)])
def test_reward_model_matches_trl(margin, center):
    from torch.nn.utils.rnn import pad_sequence
    from transformers import LlamaForSequenceClassification
    from trl import RewardTrainer

    torch.manual_seed(9)
    hf = LlamaForSequenceClassification(hf_config(num_labels=1)).eval()
    causal = LlamaForCausalLM(hf_config())
    causal.model.load_state_dict(hf.model.state_dict())
    own = build_own(hf_config(), torch.float32, state=causal.state_dict())
    rm = RewardModel(center_coefficient=center)
    rm.setup(own)
    with torch.no_grad():
        own.score.weight.copy_(hf.score.weight)

    ex = examples(seed=10)
    seqs = [torch.tensor(e["prompt_ids"] + e["chosen_ids"]) for e in ex]
    seqs += [torch.tensor(e["prompt_ids"] + e["rejected_ids"]) for e in ex]
    inputs = {"input_ids": pad_sequence(seqs, batch_first=True, padding_value=PAD),
              "attention_mask": pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)}
    rows = own_pref_rows(ex)
    if margin:
        margins = [0.3 * i for i in range(len(ex))]
        inputs["margin"] = torch.tensor(margins)
        for r, m in zip(rows, margins):
            r["margin"] = m
    t = trainer_stub(RewardTrainer, hf)
    t.args.center_rewards_coefficient = center
    want = t.compute_loss(hf, inputs)
    got, metrics = rm.loss(own, collate_preference(rows), len(ex))
    assert abs(got.item() - want.item()) < TOL
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert metrics[key] == pytest.approx(last(t._metrics, key), abs=TOL), key


def test_own_and_hf_weights_agree():
    """The premise of the parity tests: same weights, same log-probs."""
    pol, _, own, _ = hf_pair(seed=11)
    ids = torch.randint(1, V, (1, 9))
    with torch.no_grad():
        a = pol(ids).logits
        b = own.logits(own(ids))
    assert torch.allclose(a, b, atol=1e-5)
    assert copy.deepcopy(own) is not own
