"""lm2: a command-line toolkit for memory-augmented language models (LM2, RMT and vanilla baselines)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_recipe", "build_model"]


def __getattr__(name: str):
    # Lazy exports: `lm2 --help` and recipe checks must not pay for importing torch.
    if name == "load_recipe":
        from lm2cli.recipe import load_recipe

        return load_recipe
    if name == "build_model":
        from lm2cli.model import build_model

        return build_model
    raise AttributeError(f"module 'lm2cli' has no attribute {name!r}")
