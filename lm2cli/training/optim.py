"""AdamW parameter groups and the learning-rate schedule.

Weight decay goes on matrix weights only (the `.weight` of every Linear and Embedding): decaying norms,
biases or a learned initial memory bank pulls them towards zero, which is not regularisation but damage.
Memory parameters get their own groups so `train.memory_lr_mult` can scale their learning rate.

The schedule is a pure function of the step (linear warm-up, then cosine to `min_lr`), set by hand on every
step: there is no scheduler object whose state could be lost or stale on resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GroupSummary:
    name: str
    tensors: int
    params: int
    weight_decay: float
    lr_mult: float


def matrix_weight_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: weights of Linear and Embedding modules."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight is not None:
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def param_groups(model: nn.Module, weight_decay: float, memory_lr_mult: float,
                 is_memory_param: Callable[[str], bool]) -> tuple[list[dict], list[GroupSummary]]:
    """Split trainable parameters into (backbone|memory) x (decay|no decay) AdamW groups.

    Each group carries `lr_mult`, applied by `set_lr`. Empty groups are dropped; tied weights appear once
    (named_parameters de-duplicates them). Group order is deterministic, which keeps optimizer state files
    comparable across runs.
    """
    decayed = matrix_weight_names(model)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        buckets.setdefault((is_memory_param(name), name in decayed), []).append(p)
    groups, summary = [], []
    for memory in (False, True):
        for decay in (True, False):
            params = buckets.get((memory, decay), [])
            if not params:
                continue
            name = f"{'memory' if memory else 'backbone'}/{'decay' if decay else 'no_decay'}"
            wd = weight_decay if decay else 0.0
            mult = memory_lr_mult if memory else 1.0
            groups.append({"params": params, "weight_decay": wd, "lr_mult": mult, "name": name})
            summary.append(GroupSummary(name, len(params), sum(p.numel() for p in params), wd, mult))
    return groups, summary


def build_optimizer(model: nn.Module, train_cfg, is_memory_param: Callable[[str], bool],
                    device_type: str = "cpu") -> tuple[torch.optim.AdamW, list[GroupSummary]]:
    groups, summary = param_groups(model, train_cfg.weight_decay, train_cfg.memory_lr_mult, is_memory_param)
    # The fused kernel exists on CUDA only; on CPU the default (foreach) path is already the fast one.
    extra = {"fused": True} if device_type == "cuda" else {}
    opt = torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8, **extra)
    return opt, summary


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine from `lr` to `min_lr`.

    Warm-up starts at lr/warmup rather than 0 so the first step is not wasted. After `total_steps` the
    floor is held.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
