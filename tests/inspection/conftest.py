"""Fixtures for the inspection tests: a small tokenizer, tiny saved runs (lm2, rmt, vanilla) and a BABILong
directory whose rows carry fact spans, all built on the spot."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.toml"
FACTS = ["Mary moved to the bathroom.", "John went to the hallway.", "Mary got the football there.",
         "Mary travelled to the office."]
CORPUS = [*FACTS, "Where is the football?", "Sandra journeyed to the garden. Daniel took the apple there.",
          "The old lighthouse keeper watched the grey sea for many long and quiet years.",
          "Every morning the baker opened her shop before the first light reached the street."]


@pytest.fixture(scope="session")
def tokenizer():
    from lm2cli.data.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 50, model_type="bpe", vocab_size=300, byte_fallback=True,
                           character_coverage=1.0, sample_sentences=10_000, answer_token="<ans>",
                           extra_symbols=[], seed=1)


def tiny_recipe(arch: str = "lm2", *overrides: str):
    from lm2cli.recipe import load_recipe

    return load_recipe(TINY, [f"model.arch={arch}", "model.init_std=0.3", *overrides])


def tiny_model(tokenizer, arch: str = "lm2", *overrides: str):
    from lm2cli.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_recipe(arch, *overrides), vocab_size=tokenizer.vocab_size).eval()


def save_run(run_dir: Path, tokenizer, arch: str = "lm2", *overrides: str) -> Path:
    """A run directory with one checkpoint of a freshly initialised tiny model, as training leaves it."""
    from lm2cli.checkpoint import save_model_files, write_state_file

    model = tiny_model(tokenizer, arch, *overrides)
    ckpt = run_dir / "checkpoints" / "step_00000010"
    save_model_files(ckpt, model, tiny_recipe(arch, *overrides), tokenizer)
    write_state_file(ckpt, {"step": 10})  # the manifest (sizes, sha256) every reader verifies
    (run_dir / "checkpoints" / "latest").write_text("step_00000010\n")
    return run_dir


@pytest.fixture
def no_figures(monkeypatch):
    """Figures are tested once; elsewhere they would only cost time."""
    from lm2cli.inspection import figures

    monkeypatch.setattr(figures, "have_matplotlib", lambda: False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {arch: save_run(root / arch, tokenizer, arch) for arch in ("lm2", "rmt", "vanilla")}


def babilong_rows(tokenizer, length: int = 300, n: int = 3) -> list[dict]:
    from lm2cli.data.babi import Sample
    from lm2cli.data.babilong import build_row
    from lm2cli.data.haystack import BuiltinHaystack, SentenceSampler

    sample = Sample("qa2", list(FACTS), "Where is the football? ", "office", [FACTS[2], FACTS[3]], [2, 3])
    sampler = SentenceSampler(BuiltinHaystack("test", 5), tokenizer, random.Random(0))
    return [build_row(sample, length, 20, tokenizer, sampler, random.Random(k))[0] for k in range(n)]


@pytest.fixture(scope="module")
def babilong_dir(tmp_path_factory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("babilong")
    (root / "qa2").mkdir()
    (root / "qa2" / "1k.json").write_text(json.dumps(babilong_rows(tokenizer)), encoding="utf-8")
    return root
