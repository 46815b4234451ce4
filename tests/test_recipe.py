"""The recipe schema: strict loading, overrides, clear errors, round trips."""

from __future__ import annotations

import math
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm2cli import load_recipe
from lm2cli.errors import RecipeError
from lm2cli.recipe import Recipe, all_keys, recipe_from_toml, toml_value

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def problems_of(path, overrides=None) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides)
    return e.value.problems


def test_defaults_and_overrides():
    r = load_recipe(None, ["train.lr=3e-4", "model.arch=rmt", "memory.layers=[0, 1]", "train.grad_clip=inf"])
    assert isinstance(r, Recipe)
    assert r.train.lr == 3e-4 and r.model.arch == "rmt" and r.memory.layers == [0, 1]
    assert math.isinf(r.train.grad_clip)
    assert r.data.builtin_tasks == [f"qa{i}" for i in range(1, 11)]


def test_int_is_accepted_for_float_but_not_the_reverse(tmp_path):
    assert load_recipe(write(tmp_path, "[train]\nlr = 1\n")).train.lr == 1.0
    (p,) = problems_of(write(tmp_path, "[train]\nsteps = 1.5\n"))
    assert "train.steps = 1.5: expected integer" in p


def test_misspelled_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "[train]\nlrr = 0.1\n")
    (p,) = problems_of(path)
    assert str(path) in p and "train.lrr" in p and "did you mean 'lr'" in p


def test_misspelled_section_and_key_in_wrong_section(tmp_path):
    probs = problems_of(write(tmp_path, "[trian]\nlr = 0.1\n[model]\nsegment_len = 3\n"))
    assert any("trian" in p and "did you mean 'train" in p for p in probs)
    assert any("model.segment_len" in p and "memory.segment_len" in p for p in probs)
    assert len(probs) == 2  # every problem is reported, not just the first


def test_top_level_key_points_at_its_section(tmp_path):
    (p,) = problems_of(write(tmp_path, "lr = 0.1\n"))
    assert "train.lr" in p


def test_wrong_type_and_range(tmp_path):
    probs = problems_of(write(tmp_path, '[train]\nlr = "fast"\nbatch_size = 0\n[model]\narch = "gpt"\n'))
    text = "\n".join(probs)
    assert 'train.lr = "fast": expected float' in text
    assert "train.batch_size = 0: must be >= 1" in text
    assert 'model.arch = "gpt": expected "lm2" | "vanilla" | "rmt"' in text


def test_list_items_are_checked(tmp_path):
    (p,) = problems_of(write(tmp_path, '[babilong]\ntasks = ["qa1", "qa42"]\n'))
    assert "babilong.tasks" in p and "qa10" in p


def test_cross_field_checks(tmp_path):
    probs = problems_of(None, ["model.d_model=100", "model.n_heads=3", "memory.layers=9"])
    assert any("n_heads = 3 must divide model.d_model = 100" in p for p in probs)
    assert any("memory.layers = 9" in p for p in probs)


def test_malformed_toml_names_file_and_line(tmp_path):
    path = write(tmp_path, "[train]\nlr = = 3\n")
    (p,) = problems_of(path)
    assert str(path) in p and "line 2" in p


def test_missing_and_directory_recipe(tmp_path):
    (p,) = problems_of(tmp_path / "nope.toml")
    assert "not found" in p and "nope.toml" in p
    (p,) = problems_of(tmp_path)
    assert "directory" in p


def test_override_errors():
    assert "expected section.key=value" in problems_of(None, ["train.lr"])[0]
    assert "did you mean 'train.lr'" in problems_of(None, ["trian.lr=1"])[0]
    assert "--set: train.steps = \"many\"" in problems_of(None, ["train.steps=many"])[0]


def test_print_and_reload_round_trip():
    r = load_recipe(REPO / "recipes" / "small.toml", ["generate.stop=['\\n\\n', \"q\\\"\"]", "train.grad_clip=inf"])
    again = recipe_from_toml(r.to_toml())
    assert again == r


# ----------------------------------------------------------------------------- property-based robustness

toml_scalars = st.one_of(
    st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=True, width=32), st.booleans(),
    st.text(string.printable, max_size=8),
)
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3))
known_keys = st.sampled_from(all_keys())
any_key = st.one_of(known_keys, st.text(string.ascii_lowercase + "._", min_size=1, max_size=15)
                    .filter(lambda s: s.count(".") == 1 and all(s.split("."))))


@st.composite
def random_recipes(draw):
    entries = draw(st.dictionaries(any_key, toml_values, max_size=6))
    tables: dict[str, list[str]] = {}
    for dotted, value in entries.items():
        sec, key = dotted.split(".")
        tables.setdefault(sec, []).append(f"{key} = {toml_value(value)}")
    text = "\n".join(f"[{s}]\n" + "\n".join(lines) for s, lines in tables.items())
    if draw(st.booleans()):  # sometimes corrupt the text itself
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.text(string.printable, max_size=5)) + text[pos:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=random_recipes())
def test_random_recipes_load_or_fail_cleanly(tmp_path, text):
    path = tmp_path / "fuzz.toml"
    path.write_text(text)
    try:
        r = load_recipe(path)
    except RecipeError as e:
        assert e.problems and all(p and "\n" not in p for p in e.problems)
        assert all(str(path) in p for p in e.problems)
    else:
        assert recipe_from_toml(r.to_toml()) == r


@settings(max_examples=200, deadline=None)
@given(key=any_key, value=st.text(string.printable.replace("\n", "").replace("\r", ""), max_size=12))
def test_random_overrides_load_or_fail_cleanly(key, value):
    try:
        r = load_recipe(None, [f"{key}={value}"])
    except RecipeError as e:
        assert e.problems and all(p and "\n" not in p for p in e.problems)
    else:  # the override set that key and nothing else, to a value that reads back the same
        default = load_recipe(None)
        for other in all_keys():
            if other != key:
                assert value_of(r, other) == value_of(default, other), other
        assert load_recipe(None, [f"{key}={toml_value(value_of(r, key))}"]) == r


def value_of(recipe, key: str):
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def test_overrides_apply_to_any_recipe_with_the_same_checks(tmp_path):
    """`apply_overrides` is `--set` on a recipe already loaded (e.g. a checkpoint's): the result equals loading
    the file with the same overrides, the input is untouched, and bad overrides fail as `load_recipe` fails."""
    from lm2cli.recipe import apply_overrides

    path = write(tmp_path, "[train]\nlr = 0.01\n[memory]\nlayers = [0, 1]\n[model]\nn_layers = 3\n")
    base = load_recipe(path)
    sets = ["train.lr=3e-4", "model.arch=rmt", "finetune.stages=[1, 2]"]
    applied = apply_overrides(base, sets)
    assert applied == load_recipe(path, sets)
    assert base.train.lr == 0.01 and base.model.arch == "lm2" and base == load_recipe(path)
    assert apply_overrides(base, []) == base
    applied.memory.layers.append(2)  # the result shares no list with its input
    assert base.memory.layers == [0, 1]
    for bad in (["train.lr=fast"], ["trian.lr=1"], ["x"], ["train.steps=0"]):
        with pytest.raises(RecipeError) as e:
            apply_overrides(base, bad)
        assert e.value.problems == [p.replace(f"{path}: ", "") for p in problems_of(path, bad)]
    with pytest.raises(RecipeError) as e:  # the cross-key checks run on the result, naming where it came from
        apply_overrides(base, ["model.n_heads=3"], where="runs/x/recipe.toml --set")
    assert e.value.problems[0] == "runs/x/recipe.toml --set: model.n_heads = 3 must divide model.d_model = 256"
