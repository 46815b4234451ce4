"""AdamW groups (decay on matrix weights only, memory LR multiplier) and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lm2cli.training.optim import build_optimizer, lr_at, matrix_weight_names, param_groups, set_lr


class StandIn(nn.Module):
    """Embedding tied to the output layer, a norm, and a 'memory' block with a learned 2-D initial bank."""

    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.memory = nn.Module()
        self.memory.proj = nn.Linear(8, 8)
        self.memory.bank0 = nn.Parameter(torch.eye(4, 8))
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def is_memory_param(name: str) -> bool:
        return name.startswith("memory.")


def test_decay_only_on_linear_and_embedding_weights():
    names = matrix_weight_names(StandIn())
    assert names == {"tok_emb.weight", "memory.proj.weight", "lm_head.weight"}


def test_groups_split_memory_and_decay_and_count_tied_weights_once():
    model = StandIn()
    groups, summary = param_groups(model, weight_decay=0.1, memory_lr_mult=3.0, is_memory_param=model.is_memory_param)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone/decay", "backbone/no_decay", "memory/decay", "memory/no_decay"}
    assert [p.shape for p in by_name["backbone/decay"]["params"]] == [torch.Size([11, 8])]  # tied: once
    assert by_name["backbone/no_decay"]["weight_decay"] == 0.0
    assert any(p is model.memory.bank0 for p in by_name["memory/no_decay"]["params"])  # 2-D but not decayed
    assert by_name["memory/decay"]["lr_mult"] == 3.0 and by_name["backbone/decay"]["lr_mult"] == 1.0
    assert sum(s.params for s in summary) == sum(p.numel() for p in model.parameters())
    assert [(s.name, s.tensors, s.weight_decay, s.lr_mult) for s in summary] == [
        ("backbone/decay", 1, 0.1, 1.0), ("backbone/no_decay", 2, 0.0, 1.0), ("memory/decay", 1, 0.1, 3.0),
        ("memory/no_decay", 2, 0.0, 3.0)]


def test_set_lr_applies_the_memory_multiplier():
    model = StandIn()
    cfg = SimpleNamespace(weight_decay=0.1, memory_lr_mult=0.5, lr=1e-3, beta1=0.9, beta2=0.95)
    opt, _ = build_optimizer(model, cfg, model.is_memory_param)
    set_lr(opt, 2e-3)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone/decay"] == 2e-3 and lrs["memory/decay"] == 1e-3


@pytest.mark.parametrize("device_type, fused", [("cpu", None), ("cuda", True)])
def test_optimizer_takes_the_recipe_betas_and_fuses_on_cuda(device_type, fused):
    model = StandIn()
    cfg = SimpleNamespace(weight_decay=0.1, memory_lr_mult=1.0, lr=1e-3, beta1=0.8, beta2=0.95)
    opt, _ = build_optimizer(model, cfg, model.is_memory_param, device_type)  # fused AdamW also runs on CPU
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["fused"] is fused


def test_frozen_parameters_are_left_out():
    model = StandIn()
    model.norm.weight.requires_grad_(False)
    groups, _ = param_groups(model, 0.1, 1.0, model.is_memory_param)
    assert not any(p is model.norm.weight for g in groups for p in g["params"])


def test_schedule_warmup_then_cosine_to_floor():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)  # held at the floor afterwards
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay[:-1], decay[1:], strict=True))


def test_schedule_without_warmup_starts_at_peak():
    assert lr_at(0, lr=3e-4, min_lr=0.0, warmup_steps=0, total_steps=100) == pytest.approx(3e-4)
    assert lr_at(50, lr=3e-4, min_lr=0.0, warmup_steps=0, total_steps=100) == pytest.approx(1.5e-4)
    assert math.isfinite(lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=0))


def test_one_step_of_decay_reaches_the_floor():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=1, total_steps=2)
    assert [lr_at(s, **kw) for s in range(4)] == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_set_lr_on_groups_without_a_multiplier():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == 0.25
