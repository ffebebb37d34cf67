"""The optimizer, schedule, clipping and checkpoint-pruning keys do what their descriptions say (each was
read by the code but named by no test)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tunery.config import load_config
from tunery.train.checkpoint import list_checkpoints, prune_checkpoints
from tunery.train.distributed import clip_grad_norm
from tunery.train.optim import build_optimizer
from tunery.train.schedule import build_scheduler, lr_lambda, warmup_steps_for

BASE = {"base_model": "x", "adapter": "lora", "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}


def test_adam_keys_reach_the_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = load_config({**BASE, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "weight_decay": 0.1})
    opt = build_optimizer(model, cfg)
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]  # biases and norms take no weight decay


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_end_at_the_floor(kind):
    total, warmup, floor = 100, 10, 0.1
    f = lr_lambda(kind, total, warmup, floor)
    assert [round(f(s), 4) for s in range(3)] == [round((s + 1) / 11, 4) for s in range(3)]  # linear warm-up
    assert f(warmup) == pytest.approx(1.0)
    end = {"cosine": floor, "linear": floor, "constant": 1.0}[kind]
    assert f(total) == pytest.approx(end)
    if kind == "cosine":  # half way through the decay: halfway between 1 and the floor
        assert f(warmup + (total - warmup) // 2) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 2)))
    # through the optimizer: the same factors times the base lr
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, kind, total, warmup, floor)
    for _ in range(total):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * end)


def test_warmup_ratio_and_steps():
    assert warmup_steps_for(200, None, 0.05) == 10
    assert warmup_steps_for(200, 7, None) == 7
    assert warmup_steps_for(200, None, None) == 0


def test_max_grad_norm_clips_and_null_does_not():
    def params():
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.full((4,), 3.0)  # norm 6
        return [p]

    ps = params()
    norm = clip_grad_norm(ps, 1.0)
    assert float(norm) == pytest.approx(6.0) and ps[0].grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    ps = params()
    norm = clip_grad_norm(ps, None)
    assert float(norm) == pytest.approx(6.0) and ps[0].grad.norm().item() == pytest.approx(6.0)
    assert load_config({**BASE, "max_grad_norm": None}).max_grad_norm is None


def test_save_total_limit_keeps_the_newest(tmp_path: Path):
    for step in (5, 10, 15, 20):
        d = tmp_path / "checkpoints" / f"step-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
    prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [15, 20]
    prune_checkpoints(tmp_path, None)  # no limit: nothing goes
    assert [s for s, _ in list_checkpoints(tmp_path)] == [15, 20]
