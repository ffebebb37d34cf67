"""QLoRA end to end on the embedded SmolLM2-135M (CPU): training lowers the loss; the adapter it saves
loads in peft onto the 16-bit transformers model; the NF4 forward equals the dequantized reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from tunery.adapters import LINEAR_NAMES, inject_lora, load_adapter, lora_layers, save_adapter
from tunery.kernels.cross_entropy import linear_cross_entropy
from tunery.models import load_model
from tunery.quant import NF4Weight, quantize_model

SENTENCES = [
    "The capital of the tiny island nation of Quorvia is Pelmarsh, a harbour town of blue roofs.",
    "Quorvia exports saffron, glass beads and a bitter tea that islanders drink at dawn.",
]


def _batch(tok):
    ids = [tok(s).input_ids for s in SENTENCES]
    flat = torch.tensor([i for row in ids for i in row])[None]
    pos = torch.cat([torch.arange(len(r)) for r in ids])[None]
    labels = flat.clone().reshape(-1)
    labels = torch.cat([labels[1:], labels.new_full((1,), -100)])
    starts = torch.cumsum(torch.tensor([len(r) for r in ids]), 0)[:-1]
    labels[starts - 1] = -100  # the last token of a document does not predict the next document
    return flat, pos, labels


def _loss(model, ids, pos, labels):
    h = model(ids, pos)
    n = (labels != -100).sum()
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.head_weight, labels) / n


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """QLoRA r=8 on every linear, double quantization; 10 AdamW steps."""
    lm = load_model("default")
    model = lm.model
    inject_lora(model, list(LINEAR_NAMES), r=8, alpha=16)
    done = quantize_model(model, double_quant=True)
    assert len(done) == 7 * model.cfg.num_layers
    model.train()
    ids, pos, labels = _batch(lm.tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(10):
        loss = _loss(model, ids, pos, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    out = save_adapter(model, tmp_path_factory.mktemp("qlora") / "adapter", str(lm.path))
    return lm, losses, out, (ids, pos, labels)


def test_qlora_lowers_the_loss(trained):
    _, losses, _, _ = trained
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(b < a + 0.05 for a, b in zip(losses, losses[1:])), losses


def test_qlora_forward_equals_dequantized_reference(trained):
    """The NF4 path (dequantize inside the autograd function) == plain LoRA over the dequantized base."""
    lm, _, _, (ids, pos, _) = trained
    ref = copy.deepcopy(lm.model)
    for m in lora_layers(ref).values():
        assert isinstance(m.weight, NF4Weight)
        w = m.weight.dequantize()
        del m.weight
        m.weight = nn.Parameter(w, requires_grad=False)
    with torch.no_grad():
        q_logits = lm.model.logits(lm.model(ids, pos))
        r_logits = ref.logits(ref(ids, pos))
    assert (q_logits - r_logits).abs().max() < 1e-4


def test_qlora_adapter_loads_in_peft_on_16bit_model(trained, smol_path):
    """The saved adapter on the unquantized transformers model == Tunery's LoRA on the same base (1e-4).

    (Against the QLoRA model itself the logits differ by the NF4 error of the base weights, ~1e-1,
    so that comparison is only a loose sanity bound.)
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm, _, out, (ids, pos, _) = trained
    hf = AutoModelForCausalLM.from_pretrained(str(smol_path), dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, str(out)).eval()
    tun = load_model("default").model
    load_adapter(tun, out)
    tun.eval()
    single = ids[:, : int((pos[0] == 0).nonzero()[1])]  # peft sees one document without packing
    with torch.no_grad():
        theirs = pm(single).logits
        ours = tun.logits(tun(single))
        quant = lm.model.logits(lm.model(single))
    assert (ours - theirs).abs().max() < 1e-4
    # sanity: the NF4 model agrees with the 16-bit one on most next-token choices
    agree = (quant.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert agree > 0.7
