"""The model core shared by every command: `build_model(recipe)` -> LanguageModel."""

from __future__ import annotations

from lm2cli.model.model import LanguageModel, LayerState, ModelArgs, ModelState
from lm2cli.model.recorder import MemoryRecorder

__all__ = ["build_model", "LanguageModel", "ModelArgs", "ModelState", "LayerState", "MemoryRecorder"]


def build_model(recipe, vocab_size: int | None = None, device=None) -> LanguageModel:
    """Build the recipe's model (arch lm2, vanilla or rmt) with freshly initialised weights.

    The vocabulary size is `model.vocab_size`, or `vocab_size` (the tokenizer's) when the recipe leaves it at 0.
    """
    model = LanguageModel(ModelArgs.from_recipe(recipe, vocab_size))
    return model.to(device) if device is not None else model
