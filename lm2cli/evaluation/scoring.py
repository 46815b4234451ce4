"""Scoring batches without a training session: summed loss, target tokens, bytes and exact match.

This is the pure batch scorer of issue 10, written so that it can move to its final place as it is (it imports
nothing from lm2cli): the training loop's `evaluate` is meant to become a thin wrapper around `score_batches`,
and `lm2 eval`'s perplexity uses `score_logits` chunk by chunk, so both compute the same numbers.

A batch is anything with `inputs` (B, T) and `targets` (B, T) int64 tensors (targets = IGNORE where there is no
loss), `n_bytes` (UTF-8 bytes of the target tokens, 0 = not measured) and `answers` (each row's targets are one
answer plus EOS: count exact match).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # target id that carries no loss (the training loop's value)


@dataclass
class Scores:
    """Sums over scored batches; add them across batches (and all-reduce across ranks) before dividing."""

    loss_sum: float = 0.0  # summed token cross-entropy, nats
    targets: int = 0  # tokens with a target
    n_bytes: float = 0.0  # UTF-8 bytes of those targets (0 = not measured)
    correct_rows: int = 0  # answer rows whose every answer token is the argmax (teacher-forced exact match)
    answer_rows: int = 0  # rows with an answer

    def __add__(self, other: Scores) -> Scores:
        return Scores(self.loss_sum + other.loss_sum, self.targets + other.targets, self.n_bytes + other.n_bytes,
                      self.correct_rows + other.correct_rows, self.answer_rows + other.answer_rows)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.targets if self.targets else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float | None:
        return self.loss_sum / (math.log(2) * self.n_bytes) if self.n_bytes > 0 else None

    @property
    def exact_match(self) -> float | None:
        return self.correct_rows / self.answer_rows if self.answer_rows else None


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy (B, T) of each position in float32; 0 where the target is IGNORE."""
    flat = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return flat.view(targets.shape)


def score_logits(logits: Tensor, targets: Tensor, n_bytes: float = 0.0, answers: bool = False,
                 losses: Tensor | None = None) -> Scores:
    """Scores of one batch from its logits (B, T, V) and targets (B, T); `losses` = token_losses(logits,
    targets) when the caller already has them. `answers`: also count teacher-forced exact match per row."""
    mask = targets != IGNORE
    if losses is None:
        losses = token_losses(logits, targets)
    out = Scores(float(losses.sum(dtype=torch.float64)), int(mask.sum()), float(n_bytes))
    if answers:
        hit = (logits.argmax(-1) == targets) | ~mask
        rows = mask.any(dim=1)
        out.correct_rows, out.answer_rows = int((hit.all(dim=1) & rows).sum()), int(rows.sum())
    return out


@torch.no_grad()
def score_batches(model, batches, device: torch.device | str, autocast=nullcontext) -> Scores:
    """Sum of `score_logits` over `batches`, each row scored from a fresh model state in one forward pass.

    `autocast` is a zero-argument context manager factory (e.g. a Runtime's autocast, or
    `lambda: torch.autocast("cuda", dtype=torch.bfloat16)`). The model is put in eval mode for the call and
    restored afterwards.
    """
    was_training = model.training
    model.eval()
    total = Scores()
    try:
        for batch in batches:
            with autocast():
                logits, _ = model(batch.inputs.to(device), None, keep_state=False)
            total += score_logits(logits, batch.targets.to(device), batch.n_bytes, batch.answers)
    finally:
        model.train(was_training)
    return total
