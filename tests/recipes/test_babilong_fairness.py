"""Issue 13's fair-comparison checks on recipes/babilong/*.toml (LM2, RMT, vanilla, vanilla with LM2's window):
equal size, one tokenizer, the same training rows in the same order, the same evaluation samples. The shipped
recipes are checked once they exist; the smoke recipes (recipes/babilong/smoke) always, so the checks run now.
reproduce.py refuses to train recipes that fail them (`fairness_problems`, tested below on broken copies)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lm2cli.recipe import load_recipe

from .conftest import BABILONG, load_reproduce

MODELS = ["lm2", "lm2-delta", "rmt", "vanilla", "vanilla-window"]
DIRS = {"shipped": BABILONG, "smoke": BABILONG / "smoke"}
SHARED_SECTIONS = ["tokenizer", "data", "babilong", "train", "finetune", "eval"]


@pytest.fixture(params=list(DIRS), scope="module")
def recipes(request):
    where = DIRS[request.param]
    missing = [f"{m}.toml" for m in MODELS if not (where / f"{m}.toml").is_file()]
    if missing:
        pytest.skip(f"{where} has no {', '.join(missing)} yet (issue 13's recipes are being written on the "
                    f"research branch); the same checks run on the smoke recipes")
    return {m: load_recipe(where / f"{m}.toml") for m in MODELS}


def test_the_five_architectures_are_what_their_names_say(recipes):
    assert recipes["lm2"].model.arch == "lm2" and recipes["lm2"].memory.write == "attend"  # the paper's write
    assert recipes["lm2-delta"].model.arch == "lm2" and recipes["lm2-delta"].memory.write == "delta"
    assert recipes["lm2-delta"].memory.segment_len == recipes["lm2"].memory.segment_len
    assert recipes["lm2-delta"].attention == recipes["lm2"].attention
    assert recipes["rmt"].model.arch == "rmt"
    assert recipes["vanilla"].model.arch == "vanilla" and recipes["vanilla"].attention.window == 0
    assert recipes["vanilla-window"].model.arch == "vanilla"
    assert recipes["vanilla-window"].attention.window == recipes["lm2"].attention.window > 0


def test_parameter_counts_within_10_percent(recipes):
    counts = load_reproduce().parameter_counts(recipes)
    assert min(counts.values()) >= 0.9 * max(counts.values()), counts


def test_one_tokenizer_for_every_model(recipes):
    """The tokenizer is trained once (lm2 tokenize on the first recipe) from [data] and [tokenizer]: both
    sections must be identical, or the others' shards would be refused as stale (or, worse, differ)."""
    ref = recipes["lm2"]
    for name, r in recipes.items():
        assert r.tokenizer == ref.tokenizer, name
        assert r.data == ref.data, name
        assert r.model.vocab_size == ref.model.vocab_size, name


def test_same_training_rows_in_the_same_order(recipes):
    """Rows and their order follow from the data sections, train.seed, the batch shape and step counts, and the
    curriculum: finetune.stages x memory.segment_len is each stage's row budget."""
    ref = recipes["lm2"]
    for name, r in recipes.items():
        for section in ("babilong", "train", "finetune"):
            assert getattr(r, section) == getattr(ref, section), (name, section)
        assert [k * r.memory.segment_len for k in r.finetune.stages] == \
            [k * ref.memory.segment_len for k in ref.finetune.stages], name


def test_same_evaluation_samples(recipes):
    """reproduce.py evaluates every model in one `lm2 eval` call (one data set, the first rows of each file);
    the [eval] sections agree too, so evaluating a model alone from its recipe sees the same samples."""
    ref = recipes["lm2"]
    for name, r in recipes.items():
        assert r.eval == ref.eval, name


def test_fairness_problems_accepts_the_recipes(recipes):
    assert load_reproduce().fairness_problems(recipes) == []


def _broken(recipes: dict, model: str, section: str, **changes) -> dict:
    out = dict(recipes)
    out[model] = dataclasses.replace(recipes[model], **{
        section: dataclasses.replace(getattr(recipes[model], section), **changes)})
    return out


@pytest.mark.parametrize("model,section,changes,expected", [
    ("vanilla", "model", {"d_model": 64, "n_heads": 4}, "parameters"),
    ("rmt", "tokenizer", {"vocab_size": 1024}, "tokenizer.vocab_size"),
    ("vanilla-window", "data", {"seed": 99}, "data.seed"),
    ("rmt", "train", {"seed": 5}, "train.seed"),
    ("vanilla", "train", {"batch_size": 3}, "train.batch_size"),
    ("lm2", "finetune", {"stages": [1]}, "finetune.stages"),
    ("vanilla", "memory", {"segment_len": 16}, "curriculum budgets"),
    ("rmt", "eval", {"samples": 7}, "eval.samples"),
])
def test_fairness_problems_names_each_unfairness(model, section, changes, expected):
    reproduce = load_reproduce()
    smoke = {m: load_recipe(DIRS["smoke"] / f"{m}.toml") for m in MODELS}
    problems = reproduce.fairness_problems(_broken(smoke, model, section, **changes))
    assert any(expected in p for p in problems), problems


def test_fairness_allows_other_stages_at_the_same_budgets():
    """An 8x shorter segment with 8x the stages trains on the same rows (the one-backbone LM2: 128 x 8 tokens
    against the vanillas' 16 x 64); a budget that differs is still refused."""
    reproduce = load_reproduce()
    smoke = {m: load_recipe(DIRS["smoke"] / f"{m}.toml") for m in MODELS}
    ref = smoke["lm2"]
    seg, stages = ref.memory.segment_len // 8, [k * 8 for k in ref.finetune.stages]
    same = _broken(_broken(smoke, "lm2", "memory", segment_len=seg), "lm2", "finetune", stages=stages)
    assert reproduce.fairness_problems(same) == []
    other = _broken(_broken(smoke, "lm2", "memory", segment_len=seg), "lm2", "finetune", stages=stages[:-1] + [1])
    assert any("curriculum budgets" in p for p in reproduce.fairness_problems(other))


def test_pipeline_plans_load_and_name_the_five_models():
    reproduce = load_reproduce()
    for where in DIRS.values():
        if not (where / "pipeline.toml").is_file():
            continue
        for quick in (False, True):
            plan, path = reproduce.load_plan(where, quick)
            assert path == where / "pipeline.toml"
            assert plan.models == MODELS and plan.inspect_model == "lm2"
    quick, _ = reproduce.load_plan(BABILONG, quick=True)
    assert quick.tasks == ["qa1"] and quick.test_lengths == ["0k", "1k", "2k", "4k"] and len(quick.seeds) == 3
    full, _ = reproduce.load_plan(BABILONG, quick=False)
    assert full.tasks == ["qa1", "qa2", "qa3", "qa4", "qa5"]
    assert full.test_lengths == ["0k", "1k", "2k", "4k", "8k", "16k"]


def test_a_bad_plan_is_one_line_naming_the_key(tmp_path: Path):
    reproduce = load_reproduce()
    (tmp_path / "pipeline.toml").write_text("[plan]\ntest_smaples = 3\n")
    with pytest.raises(reproduce.PipelineError, match="unknown key 'test_smaples'; valid keys: models"):
        reproduce.load_plan(tmp_path, quick=False)
    (tmp_path / "pipeline.toml").write_text("[quick]\nseeds = 3\n")
    with pytest.raises(reproduce.PipelineError, match=r"\[quick\]: seeds = 3 should be a list"):
        reproduce.load_plan(tmp_path, quick=True)
    for line, message in [("base_set = [1]", "base_set = [1] should be a list of str values"),
                          ("seeds = [1, true]", "seeds = [1, True] should be a list of int values"),
                          ('tasks = ["qa1", 2]', "tasks = ['qa1', 2] should be a list of str values")]:
        (tmp_path / "pipeline.toml").write_text(f"[plan]\n{line}\n")
        with pytest.raises(reproduce.PipelineError, match=re.escape(message)):
            reproduce.load_plan(tmp_path, quick=False)


def test_a_plan_that_cannot_run_is_refused_before_any_stage(tmp_path: Path):
    reproduce = load_reproduce()
    plan = reproduce.Plan(inspect_length="32k", inspect_task="qa9", seeds=[])
    with pytest.raises(reproduce.PipelineError) as e:
        reproduce.recipe_paths(DIRS["smoke"], plan)
    assert [p.split(" ")[0] for p in e.value.problems] == \
        ["plan.inspect_task", "plan.inspect_length", "plan.seeds"]
    with pytest.raises(reproduce.PipelineError, match="missing: .*rmt.toml"):
        reproduce.recipe_paths(tmp_path, reproduce.Plan(models=["rmt"], inspect_model="rmt"))
