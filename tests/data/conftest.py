"""Shared fixtures for the data tests: a small tokenizer trained once per session on varied text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_dir(name: str) -> Path:
    """`../shared/<name>` next to the checkout, or next to one of its parents (worktrees live deeper).

    Reference data for optional checks only: tests that use it skip when it is absent.
    """
    for parent in REPO.parents:
        candidate = parent / "shared" / name
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / name

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
