"""The models under evaluation: checkpoints resolved and described first, weights loaded one model at a time."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm2cli.checkpoint import (
    Target,
    checkpoint_info,
    load_recipe_of,
    load_tokenizer_of,
    resolve_target,
    verify_checkpoint,
)
from lm2cli.errors import Lm2Error
from lm2cli.recipe import EvalConfig


@dataclass
class EvalModel:
    name: str  # column / row label in the results, unique within a run
    target: Target
    recipe: object  # the checkpoint's stored recipe (shapes, tokenizer settings)
    tokenizer: object
    info: dict  # step, sha256, val_loss
    verify_checksums: bool = True  # sha256 of every file again when the weights are loaded (sizes always)
    model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def context_limit(self) -> int | None:
        """Longest sequence the model accepts: model.max_seq_len with full attention, None (any) with a window or
        with RMT (attention never spans more than a segment)."""
        if self.recipe.attention.window > 0 or self.recipe.model.arch == "rmt":
            return None
        return self.recipe.model.max_seq_len

    @property
    def has_memory(self) -> bool:
        """Whether the model carries a memory across segments (lm2, rmt), known from its recipe before loading."""
        return self.recipe.model.arch in ("lm2", "rmt")

    def check_length(self, tokens: int, what: str) -> None:
        limit = self.context_limit
        if limit is not None and tokens > limit:
            raise Lm2Error(f"{what}: {tokens} tokens exceed model.max_seq_len = {limit} of {self.name} (full "
                           f"attention, attention.window = 0); evaluate shorter lengths for this model")

    def load(self, device: torch.device) -> torch.nn.Module:
        from lm2cli.checkpoint import load_for_inference

        if self.model is None:  # verified again here: the files may have changed while other models ran
            self.model, _, _ = load_for_inference(self.target.checkpoint, device=device,
                                                  verify_checksums=self.verify_checksums)
        return self.model

    def unload(self) -> None:
        self.model = None

    def describe(self) -> dict:
        r = self.recipe
        return {"name": self.name, "argument": self.target.argument, "checkpoint": str(self.target.checkpoint),
                "step": self.info["step"], "sha256": self.info["sha256"], "arch": r.model.arch,
                "d_model": r.model.d_model, "n_layers": r.model.n_layers, "window": r.attention.window,
                "segment_len": r.memory.segment_len, "memory_slots": r.memory.slots if r.model.arch != "vanilla"
                else 0, "tokenizer_sha256": self.tokenizer.sha256, "tokenizer_vocab": self.tokenizer.vocab_size,
                "training_val_loss": self.info["val_loss"]}


def resolve_models(arguments: list[str], verify_checksums: bool = True) -> list[EvalModel]:
    """Every argument resolved (none: the default recipe's run) and its checkpoint verified against its manifest
    (sizes, and sha256 unless `verify_checksums` is False) before its recipe and tokenizer are read, so that a
    damaged checkpoint stops the run before any model is evaluated or anything written. No weights yet; names
    made unique."""
    models = []
    for argument in arguments or [None]:
        target = resolve_target(argument)
        verify_checkpoint(target.checkpoint, checksums=verify_checksums)
        recipe = load_recipe_of(target.checkpoint)
        tokenizer = load_tokenizer_of(target.checkpoint)
        models.append(EvalModel(target.run_dir.name or str(target.run_dir), target, recipe, tokenizer,
                                checkpoint_info(target.checkpoint), verify_checksums))
    names = [m.name for m in models]
    for m in models:
        if names.count(m.name) > 1:  # the same run twice, or runs of the same name: tell them apart by step
            m.name = f"{m.name}@{m.info['step']}"
    seen: dict[str, int] = {}
    for m in models:
        seen[m.name] = seen.get(m.name, 0) + 1
        if seen[m.name] > 1:
            m.name = f"{m.name}#{seen[m.name]}"
    return models


def check_same_tokenizer(models: list[EvalModel]) -> None:
    """Side-by-side results need the same samples, token for token: refuse models with different tokenizers."""
    first = models[0]
    for m in models[1:]:
        if m.tokenizer.sha256 != first.tokenizer.sha256:
            raise Lm2Error(f"{m.target.argument} and {first.target.argument} use different tokenizers "
                           f"({m.tokenizer.sha256[:12]} vs {first.tokenizer.sha256[:12]}): their samples would "
                           f"differ, so they cannot be compared side by side; evaluate them separately")


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise Lm2Error('eval.device = "cuda" but CUDA is not available here; use "auto" or "cpu"')
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def autocast_dtype(device: torch.device, choice: str = "auto") -> torch.dtype | None:
    """eval.dtype: auto = bf16 autocast on GPU as in training and generation, exact fp32 on CPU; fp32 and bf16
    force one (fp32 on a GPU makes its answers comparable with a CPU evaluation's). The choices are the recipe
    schema's, checked here too for callers that bypass the recipe (the harness's model_args)."""
    choices = typing.get_args(typing.get_type_hints(EvalConfig)["dtype"])
    if choice not in choices:
        raise Lm2Error(f"dtype = {choice!r}: use {', '.join(choices)}")
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if choice == "bf16" else None


def default_results_dir(first: EvalModel, name: str) -> Path:
    import time

    return first.target.run_dir / "eval" / (name or time.strftime("%Y%m%d-%H%M%S"))
