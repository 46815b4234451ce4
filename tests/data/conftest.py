"""Shared fixtures for the data tests: a small tokenizer trained once per session on varied text."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_dir(*parts: str) -> Path:
    """Reference data under LM2_SHARED_DIR, else `shared/` beside the checkout (where CI and the worktrees
    have it). For optional checks only: tests that use it skip when it is absent (see `needs_shared`)."""
    return Path(os.environ.get("LM2_SHARED_DIR") or REPO.parent / "shared").joinpath(*parts)


def needs_shared(*parts: str):
    """Skip unless the reference data exists; the reason names the path looked at and the variable."""
    path = shared_dir(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"reference data {path} not found (set LM2_SHARED_DIR)")



NAMES = ["Anna", "Bruno", "Chloe", "Dmitri", "Elena", "Farid"]
VERBS = ["walked", "looked", "smiled", "waited", "spoke", "laughed", "wrote", "read"]
THINGS = ["the letter", "a lantern", "the old map", "her notes", "the window", "a green door"]


def varied_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(f"{rng.choice(NAMES)} {rng.choice(VERBS)} near {rng.choice(THINGS)}, "
                   f"and {rng.choice(NAMES)} {rng.choice(VERBS)} {rng.randint(1, 99)} times.")
    return out


@pytest.fixture(scope="session")
def small_tokenizer():
    from lm2cli.data.tokenizer import train_tokenizer

    return train_tokenizer(varied_sentences(3000), model_type="bpe", vocab_size=400, byte_fallback=True,
                           character_coverage=1.0, sample_sentences=100_000, answer_token="<ans>",
                           extra_symbols=["<sep>"], seed=1)
