"""The training loop shared by `lm2 pretrain` and `lm2 finetune` (see docs/training.md).

    pretrain_command(recipe, recipe_path, resume, resume_from, dry_run)   lm2cli.training.pretrain
    finetune_command(recipe, recipe_path, resume, resume_from, dry_run)   lm2cli.training.finetune

Modules: `loop` (the step loop, validation, saving), `session` (run directory, resume, model placement),
`checkpoints` (atomic checkpoint directories, pickle-free training state), `cursor` (row layout and the
pure-function data order), `optim` (AdamW groups, LR schedule), `metrics` (console, JSONL/CSV, TensorBoard),
`runtime` (device, dtype, DDP, signals).
"""

from __future__ import annotations

import os

from lm2cli.lazy import lazy_exports

# Set before torch loads its OpenMP runtime (training imports torch only after this package): idle compute
# threads sleep instead of spinning. On a CPU shared with other jobs, spinning threads steal the cores that
# the threads they wait for need, and a step became 2-5x slower (docs/performance.md, Training). Results do
# not depend on it. An OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["pretrain_command", "finetune_command"]

# Lazy: importing the CLI must not import torch.
__getattr__ = lazy_exports(__name__, {"pretrain_command": "lm2cli.training.pretrain",
                                      "finetune_command": "lm2cli.training.finetune"})
