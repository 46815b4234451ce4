"""What the training loop works on: a `Batch` of rows, a `Stage` of optimizer steps, the `Session` of a run.

The data side is duck-typed: pretraining windows and fine-tuning rows both provide `batch(first_row, n)` (a
`Batch` of rows by global row number), `val_batches(rank, world)` (fixed validation batches), `val_groups` (the
groups a validation also reports one by one, in order; every batch holds rows of one group), `epoch_at(rows)`,
`row_tokens` and `fixed_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lm2cli.checkpoint import CHECKPOINTS
from lm2cli.training.metrics import Console, MetricsLog
from lm2cli.training.runtime import Runtime, StopRequest


@dataclass
class Batch:
    inputs: Tensor  # (B, T) int64
    targets: Tensor  # (B, T) int64, IGNORE (lm2cli.scoring) where there is no loss
    n_tokens: int  # real (non-padding) input tokens, for throughput
    n_bytes: float = 0.0  # UTF-8 bytes of the target tokens (bits per byte); 0 = not measured
    answers: bool = False  # each row's targets are one answer (+ EOS): report exact match
    group: str = ""  # the first row's Example.group; a validation batch holds one group's rows only


@dataclass
class Stage:
    """A stretch of optimizer steps with its own schedule: all of pretraining, or one curriculum stage."""

    index: int  # 0-based
    start_step: int  # global step count when the stage begins
    steps: int
    label: str = ""  # prefix of console lines, e.g. "[stage 2/3, 2 segments] "
    best_pointers: tuple[str, ...] = ("best",)  # pointer files naming the best checkpoint of this stage

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps


@dataclass
class Session:
    """Everything the loop touches, built by session.open_session."""

    command: str  # "pretrain" | "finetune"
    recipe: Any  # resolved Recipe (model.vocab_size filled in)
    rt: Runtime
    model: torch.nn.Module  # the plain module: saved, evaluated
    train_model: torch.nn.Module  # what the step runs: compiled and/or DDP-wrapped `model`
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    run_dir: Path
    console: Console
    metrics: MetricsLog | None  # rank 0 only
    stop: StopRequest
    resume_hint: str  # the command that resumes this run
    flops_per_token: float = 0.0  # the model's estimate at train.seq_len, for MFU
    step: int = 0  # optimizer steps done (global, across stages)
    rows_done: int = 0  # data cursor: rows consumed by this stage so far (see cursor.RowOrder)
    stage: int = 0
    best: dict[str, dict] = field(default_factory=dict)  # pointer name -> {"val_loss", "checkpoint"}
    carry: Any = None  # memory carried across steps (memory.carry = true)
    steps_this_run: int = 0  # optimizer steps taken by this process (0: the weights are as loaded/initialised)
    train_seconds: float = 0.0  # wall time spent in training steps, across resumes
    fsdp: bool = False  # `model` is sharded in place (train.distributed = "fsdp" under torchrun)
    extra_state: dict = field(default_factory=dict)  # values stored in trainer_state.json besides the loop's

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / CHECKPOINTS

    def say(self, text: str) -> None:
        self.console.say(text)
