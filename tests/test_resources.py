"""Memory estimates made before allocating (issue 9): exact parameter counts from the meta device, estimates
that refuse the impossible but none of the shipped or reasonable runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm2cli import build_model, load_recipe
from lm2cli.errors import Lm2Error
from lm2cli.resources import GIB, check_training_fits, inference_estimate, meta_model, training_estimate
from lm2cli.training.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sets", [["model.arch=lm2"], ["model.arch=rmt"], ["model.arch=vanilla"],
                                  ["model.tie_embeddings=false", "memory.init=learned", "memory.layers=[1]"]])
def test_meta_model_has_the_real_models_shapes(sets):
    recipe = load_recipe(None, ["model.d_model=32", "model.n_layers=2", "memory.slots=4", "memory.heads=2", *sets])
    real = build_model(recipe, 300)
    meta = meta_model(recipe, 300)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert {n: p.shape for n, p in meta.state_dict().items()} == {n: p.shape for n, p in real.state_dict().items()}


def cpu_runtime() -> Runtime:
    return Runtime(torch.device("cpu"), "fp32", "test")


LAPTOP_RECIPES = sorted(p for p in (REPO / "recipes").glob("*.toml") if not p.name.startswith("gpu-"))
GPU_RECIPES = sorted((REPO / "recipes").glob("gpu-*.toml"))


@pytest.mark.parametrize("recipe", LAPTOP_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_fit_a_laptop(recipe, monkeypatch):
    r = load_recipe(recipe)
    est = training_estimate(r, r.tokenizer.vocab_size)
    assert 0 < est.total < 2 * GIB, est.describe()
    monkeypatch.setenv("LM2_MEMORY_LIMIT", str(4 * GIB))
    check_training_fits(r, r.tokenizer.vocab_size, cpu_runtime())
    assert inference_estimate(r, r.tokenizer.vocab_size).total < GIB


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.name)
def test_shipped_gpu_recipes_fit_one_80_gib_gpu(recipe):
    """gpu-*.toml are for one data-centre GPU (A100/H100 80 GB): the fp32 estimate is an upper bound there."""
    r = load_recipe(recipe)
    est = training_estimate(r, r.tokenizer.vocab_size)
    assert 2 * GIB < est.total < 80 * GIB, est.describe()


def test_a_125m_model_fits_a_big_machine_and_not_a_small_one(monkeypatch):
    r = load_recipe(None, ["model.d_model=768", "model.n_layers=12", "model.n_heads=12", "memory.heads=12",
                           "memory.slots=16", "train.seq_len=1024", "train.batch_size=8"])
    est = training_estimate(r, 32000)
    params = sum(p.numel() for p in meta_model(r, 32000).parameters())
    assert 100e6 < params < 200e6
    assert 16 * params < est.total < 24 * GIB, est.describe()  # a lower bound, not a guess that overshoots
    monkeypatch.setenv("LM2_MEMORY_LIMIT", str(128 * GIB))
    check_training_fits(r, 32000, cpu_runtime())
    monkeypatch.setenv("LM2_MEMORY_LIMIT", str(1 * GIB))
    with pytest.raises(Lm2Error, match=r"training needs at least .* but this machine has 1.0 GiB "
                                       r"\(LM2_MEMORY_LIMIT\); lower train.batch_size, train.seq_len, or set "
                                       r"train.activation_checkpointing"):
        check_training_fits(r, 32000, cpu_runtime())


def test_the_largest_part_names_the_keys(monkeypatch):
    monkeypatch.setenv("LM2_MEMORY_LIMIT", str(GIB))
    for sets, keys in ((["memory.slots=100000000"], "lower memory.slots"),
                       (["model.d_model=8192"], "lower model.d_model, model.n_layers"),
                       (["model.vocab_size=50000000"], "lower train.batch_size, train.seq_len, model.vocab_size")):
        r = load_recipe(REPO / "recipes" / "tiny.toml", sets)
        with pytest.raises(Lm2Error, match=keys):
            check_training_fits(r, 400, cpu_runtime())
