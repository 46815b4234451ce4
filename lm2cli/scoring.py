"""Scoring batches without a training session: summed loss, target tokens, bytes and exact match.

Training's validation (`lm2cli.training.loop.evaluate`, a thin wrapper that adds ranks) and `lm2 eval`'s
perplexity both score here, so the same model on the same rows gives the same numbers in both (tested to 1e-6).
Nothing here imports the rest of lm2.

A batch is anything with `inputs` (B, T) and `targets` (B, T) int64 tensors (targets = IGNORE where there is no
loss), `n_bytes` (UTF-8 bytes of the target tokens, 0 = not measured) and `answers` (each row's targets are one
answer plus EOS: count exact match), such as `lm2cli.training.types.Batch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # target id that carries no loss (context, padding)


@dataclass
class Scores:
    """Sums over scored batches; add them across batches (and all-reduce across ranks) before dividing."""

    loss_sum: float = 0.0  # summed token cross-entropy, nats
    targets: int = 0  # tokens with a target
    n_bytes: float = 0.0  # UTF-8 bytes of those targets (0 = not measured)
    correct_rows: int = 0  # answer rows whose every answer token is the argmax (teacher-forced exact match)
    answer_rows: int = 0  # rows with an answer

    def __add__(self, other: Scores) -> Scores:
        return Scores(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def to_tensor(self, device=None) -> Tensor:
        """The five sums as one float64 tensor (for an all-reduce); `Scores.from_tensor` reads it back."""
        return torch.tensor(astuple(self), dtype=torch.float64, device=device)

    @staticmethod
    def from_tensor(t: Tensor) -> Scores:
        loss_sum, targets, n_bytes, correct, rows = t.tolist()
        return Scores(loss_sum, int(targets), n_bytes, int(correct), int(rows))

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


def loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed token cross-entropy over positions with a target (float32 logits from the model): the training
    objective, and the loss a validation reports. `logits` (B, T, V), or packed (N, V): the logits of the target
    positions only, in row-major order (`model(..., logits_at=targets != IGNORE)`)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), targets[targets != IGNORE], reduction="sum")
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy (B, T) of each position in float32; 0 where the target is IGNORE."""
    flat = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return flat.view(targets.shape)


LossFn = Callable[[Tensor, Tensor], Tensor]


def score_logits(logits: Tensor, targets: Tensor, n_bytes: float = 0.0, answers: bool = False,
                 losses: Tensor | None = None, loss: LossFn = loss_sum) -> Scores:
    """Scores of one batch from its logits (B, T, V) and targets (B, T). The summed loss is `losses.sum()` when
    the caller already has per-token losses (`token_losses`), else `loss(logits, targets)`. `answers`: also
    count teacher-forced exact match per row (a row counts when the argmax at every answer position, EOS
    included, is the target: exactly when greedy decoding would reproduce the answer and stop)."""
    mask = targets != IGNORE
    total = losses.sum(dtype=torch.float64) if losses is not None else loss(logits, targets)
    out = Scores(float(total), int(mask.sum()), float(n_bytes))
    if answers:
        correct, rows = answer_hits(logits, targets)
        out.correct_rows, out.answer_rows = int(correct), int(rows)
    return out


def answer_hits(logits: Tensor, targets: Tensor) -> Tensor:
    """(rows whose every answer position's argmax is the target, rows with an answer) as a 2-element tensor:
    teacher-forced exact match, from logits a training step already has (no extra forward). `logits` (B, T, V),
    or packed (N, V) at the target positions, as for `loss_sum`."""
    with torch.no_grad():
        mask = targets != IGNORE
        if logits.dim() == 2:
            wrong = (logits.argmax(-1) != targets[mask]).long()
            misses = torch.zeros(targets.shape[0], dtype=torch.long, device=targets.device)
            misses.index_add_(0, mask.nonzero()[:, 0], wrong)
        else:
            misses = ((logits.argmax(-1) != targets) & mask).sum(dim=1)
        rows = mask.any(dim=1)
        return torch.stack([((misses == 0) & rows).sum(), rows.sum()])


@torch.no_grad()
def score_batches(model, batches: Iterable, device: torch.device | str, autocast=nullcontext,
                  loss: LossFn = loss_sum, at_targets: bool = False) -> Scores:
    """Sum of `score_logits` over `batches`, each row scored from a fresh model state in one forward pass.

    `autocast` is a zero-argument context manager factory (a Runtime's autocast, or
    `lambda: torch.autocast("cuda", dtype=torch.bfloat16)`); `loss` the summed-loss function (training passes
    the one its steps minimise). `at_targets`: the model (an lm2 LanguageModel) computes logits at the target
    positions only (`logits_at`), all that the summed loss and the exact match need. The model is put in eval
    mode for the call and restored afterwards.
    """
    was_training = model.training
    model.eval()
    total = Scores()
    try:
        for batch in batches:
            targets = batch.targets.to(device)
            at = {"logits_at": targets != IGNORE} if at_targets else {}
            with autocast():
                logits, _ = model(batch.inputs.to(device), None, keep_state=False, **at)
            total += score_logits(logits, targets, batch.n_bytes, batch.answers, loss=loss)
    finally:
        model.train(was_training)
    return total
