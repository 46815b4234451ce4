"""lm2: a command-line toolkit for memory-augmented language models (LM2, RMT and vanilla baselines)."""

from __future__ import annotations

from lm2cli.lazy import lazy_exports
from lm2cli.version import __version__

__all__ = ["__version__", "load_recipe", "build_model"]

__getattr__ = lazy_exports(__name__, {"load_recipe": "lm2cli.recipe", "build_model": "lm2cli.model"})
