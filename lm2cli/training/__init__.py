"""The training loop shared by `lm2 pretrain` and `lm2 finetune` (see docs/training.md).

    pretrain_command(recipe, recipe_path, resume, resume_from, dry_run)   lm2cli.training.pretrain
    finetune_command(recipe, recipe_path, resume, resume_from, dry_run)   lm2cli.training.finetune

Modules: `loop` (the step loop, validation, saving), `session` (run directory, resume, model placement),
`checkpoints` (atomic checkpoint directories, pickle-free training state), `cursor` (row layout and the
pure-function data order), `optim` (AdamW groups, LR schedule), `metrics` (console, JSONL/CSV, TensorBoard),
`runtime` (device, dtype, DDP, signals).
"""

from __future__ import annotations

__all__ = ["pretrain_command", "finetune_command"]


def __getattr__(name: str):
    # Lazy: importing the CLI must not import torch.
    if name == "pretrain_command":
        from lm2cli.training.pretrain import pretrain_command

        return pretrain_command
    if name == "finetune_command":
        from lm2cli.training.finetune import finetune_command

        return finetune_command
    raise AttributeError(f"module 'lm2cli.training' has no attribute {name!r}")
