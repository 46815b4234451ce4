"""recipes/babilong/reproduce.py is a script, not a package module: the tests load it by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BABILONG = Path(__file__).resolve().parents[2] / "recipes" / "babilong"


def load_reproduce():
    if "reproduce" not in sys.modules:
        spec = importlib.util.spec_from_file_location("reproduce", BABILONG / "reproduce.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["reproduce"] = module
        spec.loader.exec_module(module)
    return sys.modules["reproduce"]


@pytest.fixture(scope="session")
def reproduce():
    return load_reproduce()


def plan_problems(reproduce, tmp_path: Path, plan_toml: str, recipes: Path) -> list[str]:
    """The problems reproduce.py reports (PipelineError) for a pipeline.toml with `plan_toml` over `recipes`."""
    (tmp_path / "pipeline.toml").write_text(plan_toml)
    with pytest.raises(reproduce.PipelineError) as e:
        reproduce.recipe_paths(recipes, reproduce.load_plan(tmp_path, quick=False)[0])
    return [str(e.value), *e.value.problems]
