"""Gemma 1/2/3 switches of the own decoder (logits parity against transformers is in test_decoder_parity)."""

from __future__ import annotations

import math

import pytest
import torch

from tunery.kernels.cross_entropy import linear_cross_entropy
from tunery.models import build_own
from tunery.models.registry import decoder_config

TINY = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8)


def test_gemma_switches():
    c = decoder_config(dict(model_type="gemma", num_hidden_layers=2, hidden_act="gelu", **TINY))
    assert c.norm_offset == 1.0 and c.embed_scale == pytest.approx(math.sqrt(32))
    assert c.hidden_act == "gelu_tanh" or c.hidden_act == "gelu"
    assert not c.sandwich_norm and c.attn_softcap is None and c.window_for(0) is None


def test_gemma2_switches_and_default_layer_types():
    c = decoder_config(dict(model_type="gemma2", num_hidden_layers=4, hidden_activation="gelu_pytorch_tanh",
                            query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                            sliding_window=64, **TINY))
    assert c.sandwich_norm and c.hidden_act == "gelu_tanh"
    assert c.query_scale == pytest.approx(16 ** -0.5)
    assert (c.attn_softcap, c.final_softcap) == (50.0, 30.0)
    assert [c.window_for(i) for i in range(4)] == [64, None, 64, None]  # sliding first, as transformers


def test_gemma3_switches_from_a_plain_config_dict():
    """The shape of a Gemma 3 1B config.json: no layer_types, local rope base, no soft-capping."""
    c = decoder_config(dict(model_type="gemma3_text", num_hidden_layers=7, hidden_activation="gelu_pytorch_tanh",
                            query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
                            rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None,
                            final_logit_softcapping=None, attn_logit_softcapping=None, **TINY))
    assert c.qk_norm and c.sandwich_norm and c.attn_softcap is None and c.final_softcap is None
    assert [c.window_for(i) for i in range(7)] == [512] * 5 + [None, 512]
    assert c.rope["rope_theta"] == 1e6 and c.local_rope["rope_theta"] == 1e4
    m = build_own(dict(model_type="gemma3_text", num_hidden_layers=7, query_pre_attn_scalar=256,
                       sliding_window=512, rope_theta=1e6, rope_local_base_freq=1e4, **TINY), torch.float32)
    assert [b.local for b in m.model.layers] == [True] * 5 + [False, True]
    assert not torch.equal(m.model.inv_freq, m.model.inv_freq_local)


def test_final_softcap_in_the_loss_matches_logits():
    torch.manual_seed(0)
    m = build_own(dict(model_type="gemma2", num_hidden_layers=2, final_logit_softcapping=2.0,
                       attn_logit_softcapping=5.0, sliding_window=4, **TINY), torch.float32).eval()
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 1.0)  # large logits, so the cap matters
    ids = torch.randint(0, 80, (1, 10))
    h = m(ids)
    labels = torch.cat([ids[0, 1:], torch.tensor([-100])])
    logits = m.logits(h)[0]
    assert logits.abs().max() <= 2.0
    ref = torch.nn.functional.cross_entropy(logits[:-1], labels[:-1], reduction="sum")
    for fused in (False, True):
        got = linear_cross_entropy(h[0], m.head_weight, labels, softcap=m.cfg.final_softcap, fused=fused)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
