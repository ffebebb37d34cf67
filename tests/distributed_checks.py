"""Run under torchrun by tests/test_distributed.py: checks of the parallel wiring at the tensor level.

Every rank also builds the same model unsharded and runs the whole global batch through it, so each
sharded / replicated gradient is compared against the one-process gradient directly.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_checks.py
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from tunery.adapters import inject_lora
from tunery.kernels.cross_entropy import linear_cross_entropy
from tunery.models import build_own
from tunery.train import distributed as dist_util
from tunery.train.optim import trainable_parameters
from tunery.train.parallel import parallelize

TOL = 1e-5


def tiny(tied: bool = True):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return build_own(hf, torch.float32)


def cfg(**kw):
    base = dict(fsdp=None, fsdp_config=None, dp_replicate_size=None, gradient_checkpointing=False, bf16=False,
                fp16=False, tf32=False, adapter=None)
    base.update(kw)
    return SimpleNamespace(**base)


def loss_of(model, ids: torch.Tensor, normalizer: int) -> torch.Tensor:
    h = model(ids)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.head_weight, labels.reshape(-1)) / normalizer


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, 24), generator=g) for _ in range(4)]


def reference_grads(model) -> tuple[dict[str, torch.Tensor], float]:
    data = batches()
    n = sum(int(b.numel()) - 1 for b in data)
    for b in data:
        loss_of(model, b, n).backward()
    grads = {name: p.grad.clone() for name, p in trainable_parameters(model)}
    return grads, dist_util.clip_grad_norm([p for _, p in trainable_parameters(model)], None)


def check(name: str, make, c) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    ref_model = make()
    ref, ref_norm = reference_grads(ref_model)
    model = make()
    run = parallelize(model, c, torch.device("cpu"))
    data = batches()
    n = sum(int(b.numel()) - 1 for b in data)
    mine = data[rank::world]
    for i, b in enumerate(mine):
        with dist_util.sync_gradients(run, i == len(mine) - 1):
            loss_of(run, b, n).backward()
    params = trainable_parameters(model)
    assert [k for k, _ in params] == list(ref), f"{name}: trainable parameter names differ"
    for k, p in params:
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        err = (g - ref[k]).abs().max().item()
        assert err < TOL, f"{name}: gradient of {k} differs by {err}"
    norm = dist_util.clip_grad_norm([p for _, p in params], None)
    assert abs(norm - ref_norm) < 1e-4 * max(1.0, ref_norm), f"{name}: grad norm {norm} vs {ref_norm}"
    if c.fsdp:  # an eval forward leaves the root gathered; reshard() brings back the shards
        with torch.no_grad():
            loss_of(run, data[0], n)
        dist_util.reshard(model)
        assert all(hasattr(p, "to_local") for _, p in trainable_parameters(model)), f"{name}: not resharded"
    if rank == 0:
        print(f"ok {name}", flush=True)


def qlora_model():
    from tunery.quant import quantize_model

    m = tiny()
    inject_lora(m, ["q_proj", "v_proj", "down_proj"], 4, 8)
    with torch.no_grad():
        for k, p in trainable_parameters(m):
            if k.endswith("lora_B"):
                p.normal_(0, 0.02)  # non-zero B so every adapter gets a gradient worth comparing
    quantize_model(m, double_quant=True)
    return m


def lora_model():
    m = tiny()
    inject_lora(m, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4, 8)
    return m


def check_nf4_sharded(c) -> None:
    """The 4-bit bytes are FSDP parameters (sharded), not replicated buffers."""
    from tunery.quant import NF4Weight

    m = qlora_model()
    full = {id(w): w.packed.numel() for w in m.modules() if isinstance(w, NF4Weight)}
    parallelize(m, c, torch.device("cpu"))
    world = dist.get_world_size()
    nf4 = [w for w in m.modules() if isinstance(w, NF4Weight)]
    assert nf4, "no NF4 weights"
    for w in nf4:
        assert "packed" in w._parameters and not w.packed.requires_grad
        local = w.packed.to_local().numel()
        assert local <= -(-full[id(w)] // world), "NF4 packed bytes are not sharded"
    if dist.get_rank() == 0:
        print("ok nf4-sharded", flush=True)


def main() -> int:
    dist_util.init(300)
    from tunery.config.distributed import FSDPConfig

    fsdp = ["full_shard", "auto_wrap"]
    check("full-fsdp", tiny, cfg(fsdp=fsdp))
    check("full-fsdp-untied-shard_grad_op", lambda: tiny(False), cfg(fsdp=fsdp + ["shard_grad_op"]))
    check("full-ddp", tiny, cfg())
    check("full-hsdp", tiny, cfg(fsdp=fsdp, dp_replicate_size=dist.get_world_size()))
    check("lora-fsdp", lora_model, cfg(fsdp=fsdp, adapter="lora"))
    check("lora-ddp", lora_model, cfg(adapter="lora"))
    check("lora-fsdp-offload", lora_model, cfg(fsdp=fsdp, adapter="lora",
                                                 fsdp_config=FSDPConfig(fsdp_offload_params=True)))
    check("qlora-fsdp", qlora_model, cfg(fsdp=fsdp, adapter="qlora"))
    check_nf4_sharded(cfg(fsdp=fsdp, adapter="qlora"))
    dist_util.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
