"""Every shipped recipe loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm2cli import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def test_the_quickstart_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"small", "tiny"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    r = load_recipe(path)
    assert r.train.seq_len >= 2 * r.memory.segment_len or r.model.arch == "vanilla", \
        "pretraining sequences should span several memory segments"
