"""CLI fuzzing (issue 9, "keep it from coming back"): recipes, overrides, output paths, prompts and checkpoint
files, each case built to hold a known number of problems. Every case must end with exit code 2, exactly one
`error:` line per problem and no traceback.

Hypothesis runs derandomized (a fixed seed derived from each test), so CI sees the same cases every time; a
failure prints the case to reproduce.
"""

from __future__ import annotations

import itertools
import json
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm2cli.recipe import section_fields, sections, toml_value

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.toml"
FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_counter = itertools.count()


def case_dir(tmp_path: Path) -> Path:
    d = tmp_path / f"case{next(_counter)}"
    d.mkdir()
    return d


def check(res, problems: int) -> None:
    lines = res.err.splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert "Traceback" not in res.err, res.err
    assert res.code == 2 and len(errors) == problems, (res.code, problems, res.err)


# -------------------------------------------------------------------------------------- recipe defects


FIELDS = {f"{s}.{k}": (tp, f.metadata) for s, cls in sections().items() for k, (tp, f) in section_fields(cls).items()}


def _is(tp, kind) -> bool:
    return tp is kind or typing.get_origin(tp) is kind


def defects_for(key: str) -> list[tuple[str, str]]:
    """(how, TOML value) pairs that are each exactly one problem for `key`."""
    tp, meta = FIELDS[key]
    out = [("table", "{ x = 1 }"), ("date", "1979-05-27")]  # no schema type accepts these
    if tp is float:
        out += [("nan", "nan")] + ([] if meta.get("allow_inf") else [("inf", "inf"), ("-inf", "-inf")])
    if tp in (int, float):
        out.append(("text", '"12"'))
        low = meta.get("min") if meta.get("min") is not None else meta.get("gt")
        if low is not None:
            out.append(("below range", toml_value(type(low)(low) - 1 if tp is int else float(low) - 0.5)))
    if tp is str:
        out += [("NUL", '"a\\u0000b"'), ("number", "3")]
    if typing.get_origin(tp) is typing.Literal:
        out.append(("not a choice", '"nope"'))
    if _is(tp, list) and meta.get("items"):
        out.append(("unknown item", '["zz9"]'))
    if tp is bool:
        out.append(("word", '"yes"'))
    return out


@st.composite
def recipe_defects(draw):
    """(recipe text, --set arguments, number of problems): 1-4 defects on distinct keys, in the file or as
    overrides, plus sometimes an unknown key."""
    keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4, unique=True))
    file_lines: dict[str, list[str]] = {}
    sets = []
    for key in keys:
        how, value = draw(st.sampled_from(defects_for(key)))
        section, name = key.split(".")
        if draw(st.booleans()):
            file_lines.setdefault(section, []).append(f"{name} = {value}")
        else:
            sets += ["--set", f"{key}={value}"]
    problems = len(keys)
    if draw(st.booleans()):
        sets += ["--set", f"{draw(st.sampled_from(sorted(sections())))}.no_such_key_{draw(st.integers(0, 9))}=1"]
        problems += 1
    text = "".join(f"[{sec}]\n" + "".join(f"{ln}\n" for ln in lines) for sec, lines in file_lines.items())
    return text, sets, problems


# inspect-memory takes RUN_OR_CHECKPOINT_OR_RECIPE and no --set (tests/inspection/test_command.py covers a bad
# recipe as its target)
# eval takes RUN_OR_CHECKPOINT_OR_RECIPE and only eval.* keys, no --print-recipe (tests/evaluation/test_command.py
# covers a bad recipe as its target and every --set problem reported at once)
RECIPE_COMMANDS = ["tokenize", "pretrain", "finetune", "babilong"]


@settings(FUZZ, max_examples=120)
@given(case=recipe_defects(), command=st.sampled_from(RECIPE_COMMANDS), print_recipe=st.booleans())
def test_recipe_and_override_defects(cli, tmp_path, case, command, print_recipe):
    text, sets, problems = case
    recipe = case_dir(tmp_path) / "r.toml"
    recipe.write_text(text)
    check(cli(command, recipe, *sets, *(["--print-recipe"] if print_recipe else [])), problems)


@settings(FUZZ, max_examples=30)
@given(data=st.binary(min_size=1, max_size=200), command=st.sampled_from(RECIPE_COMMANDS))
def test_recipe_files_that_are_not_toml(cli, tmp_path, data, command):
    try:
        import tomllib

        tomllib.loads(data.decode("utf-8"))
        return  # valid TOML by chance: covered above
    except (UnicodeDecodeError, ValueError):
        pass
    recipe = case_dir(tmp_path) / "r.toml"
    recipe.write_bytes(data)
    check(cli(command, recipe, "--print-recipe"), 1)


# ---------------------------------------------------------------------------------------- output paths


@st.composite
def bad_outputs(draw):
    """(command arguments after the recipe, a function building the bad path in a case directory)."""
    command = draw(st.sampled_from(["tokenize", "pretrain", "finetune", "babilong", "babi-text"]))
    kind = draw(st.sampled_from(["empty", "blank", "file", "under file", "unwritable", "foreign", "user recipe"]))
    return command, kind


def make_path(d: Path, kind: str) -> str:
    if kind in ("empty", "blank"):
        return "" if kind == "empty" else "  "
    if kind in ("file", "under file"):
        (d / "f").write_text("mine")
        return str(d / "f") if kind == "file" else str(d / "f" / "x")
    if kind == "unwritable":
        return "/sys/lm2-fuzz"
    out = d / "out"
    out.mkdir()
    (out / ("recipe.toml" if kind == "user recipe" else "notes.txt")).write_text("# mine\n")
    return str(out)


@settings(FUZZ, max_examples=40)
@given(case=bad_outputs())
def test_bad_output_paths(cli, tmp_path, case):
    command, kind = case
    d = case_dir(tmp_path)
    path = make_path(d, kind)
    if kind == "unwritable" and not Path("/sys").is_dir():
        return
    if kind == "user recipe" and command in ("babilong", "babi-text"):
        return  # they write no recipe.toml: a directory holding one is just foreign (covered by "foreign")
    sets = ["--set", f"data.dir={d / 'nodata'}", "--set", "tokenizer.path=''"]
    if command == "babi-text":
        args = ["babilong", TINY, *sets, "--babi-text", path, "--train-questions", "2", "--test-questions", "2"]
    else:
        args = [command, TINY, *sets, "--out", path]
    res = cli(*args)
    check(res, 1)
    if kind in ("foreign", "user recipe"):
        assert (Path(path) / ("recipe.toml" if kind == "user recipe" else "notes.txt")).read_text() == "# mine\n"


# --------------------------------------------------------------------------------- prompts and flags


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    from lm2cli.data.tokenizer import train_tokenizer
    from tests.generation.test_cli_generate import save_run

    tok = train_tokenizer([f"Mary went to the kitchen {i}. John took the apple." for i in range(300)],
                          model_type="bpe", vocab_size=300, byte_fallback=True, character_coverage=1.0,
                          sample_sentences=1000, answer_token="<ans>", extra_symbols=[], seed=0)
    return save_run(tmp_path_factory.mktemp("fuzz-gen") / "run", tok)


BAD_FLAGS = {"--top-p": ["0", "7", "nan", "inf"], "--temperature": ["-1", "inf", "nan"],
             "--repetition-penalty": ["0", "-2", "inf"], "--max-new-tokens": ["0", "-5"],
             "--min-new-tokens": ["-1"], "--top-k": ["-3"], "--repetition-window": ["-1"], "--threads": ["-2"],
             "--stop": ["a\udcffb"]}
BAD_ROWS = ['{"prompt": 3}', "not json", '{"prompt": "x", "top_p": 9}', '{"prompt": "x", "tempreature": 1}',
            '{"prompt": "x\\udcff"}', '{"prompt": "ok", "id": "\\ud800"}', "[1, 2]", '{"prompt": "x", "greedy": 2}']


@st.composite
def bad_generate(draw):
    """(generate arguments, problems): bad flag values, or a prompts file of bad rows, or a bad prompt."""
    how = draw(st.sampled_from(["flags", "rows", "prompt"]))
    if how == "flags":
        flags = draw(st.lists(st.sampled_from(sorted(BAD_FLAGS)), min_size=1, max_size=4, unique=True))
        args = [x for f in flags for x in (f, draw(st.sampled_from(BAD_FLAGS[f])))]
        return ["--prompt", "Mary", *args], len(flags)
    if how == "rows":
        rows = draw(st.lists(st.sampled_from(BAD_ROWS), min_size=1, max_size=14))
        good = draw(st.integers(0, 3))
        return ("rows", rows, good), min(len(rows), 10) + (1 if len(rows) > 10 else 0)
    prompt = draw(st.sampled_from(["", "   ", "\n", "Mary \udcff", "a\x00b"]))
    return ["--prompt", prompt], 1


@settings(FUZZ, max_examples=50)
@given(case=bad_generate())
def test_bad_prompts_and_flags(cli, tmp_path, gen_run, case):
    args, problems = case
    if isinstance(args, tuple):
        _, rows, good = args
        path = case_dir(tmp_path) / "p.jsonl"
        path.write_text("\n".join(['{"prompt": "fine"}'] * good + rows) + "\n")
        args = ["--prompts", str(path)]
    check(cli("generate", gen_run, *args), problems)


# inspect-memory stops at the first bad option (each is checked before the model runs, or right after the text
# is tokenized): one bad flag per case, one line.
BAD_INSPECT = {"--read-at": ["-1", "99999"], "--slots": ["3:1", "0:0", "a", "0:999"], "--heads": ["z", "-1", "7"],
               "--layer": ["q", "9"], "--top-tokens": ["0", "-3"], "--generate": ["-1"]}


@settings(FUZZ, max_examples=12)
@given(flag=st.sampled_from(sorted(BAD_INSPECT)), data=st.data())
def test_bad_inspect_memory_flags(cli, tmp_path, gen_run, flag, data):
    value = data.draw(st.sampled_from(BAD_INSPECT[flag]))
    out = case_dir(tmp_path) / "out"
    check(cli("inspect-memory", gen_run, "--prompt", "Mary went", flag, value, "--out", str(out)), 1)
    assert not out.exists()  # nothing written for a refused option


# ----------------------------------------------------------------------------------- checkpoint files


CKPT_FILES = ["model.safetensors", "recipe.toml", "tokenizer.model"]


@st.composite
def damage(draw):
    how = draw(st.sampled_from(["truncate", "flip", "delete", "state json", "state bytes", "recipe", "header",
                                "memory option", "memory choice", "memory kind", "memory window"]))
    name = draw(st.sampled_from(CKPT_FILES))
    return how, name, draw(st.integers(0, 10**9)), draw(st.binary(min_size=1, max_size=64))


def apply_damage(ckpt: Path, how: str, name: str, n: int, noise: bytes) -> int:
    """Damage `ckpt` in place; returns the number of problems it must report."""
    from lm2cli.checkpoint import write_state_file

    path = ckpt / name
    data = path.read_bytes()
    state_path = ckpt / "trainer_state.json"
    state = json.loads(state_path.read_text())
    if how == "truncate":
        path.write_bytes(data[: n % len(data)])
    elif how == "flip":
        b = bytearray(data)
        b[n % len(b)] ^= 1 << (n % 8)
        path.write_bytes(bytes(b))
    elif how == "delete":
        path.unlink()
    elif how == "state json":  # valid JSON, wrong content: a mutated copy of the real state
        key = sorted(state)[n % len(state)]
        state[key] = [None, "x", -1, {"a": 1}, [], 1e308][n % 6]
        if key in ("format", "version", "manifest") or n % 2:
            state["manifest"] = {"model.safetensors": "??"} if key != "manifest" else state[key]
        else:
            state.pop("manifest")
        state_path.write_text(json.dumps(state))
    elif how == "state bytes":
        state_path.write_bytes(noise)
    elif how == "memory option":  # re-signed, valid recipe whose memory has tensors the weights lack (slot keys)
        recipe = (ckpt / "recipe.toml").read_text()
        assert "slot_keys = false" in recipe
        (ckpt / "recipe.toml").write_text(recipe.replace("slot_keys = false", "slot_keys = true"))
        write_state_file(ckpt, state)
    elif how == "memory choice":  # re-signed: a memory.write the schema does not know (no code picked by name)
        recipe = (ckpt / "recipe.toml").read_text()
        assert 'write = "attend"' in recipe
        (ckpt / "recipe.toml").write_text(recipe.replace('write = "attend"', 'write = "__import__"'))
        write_state_file(ckpt, state)
    elif how == "memory kind":  # re-signed: a valid memory.write whose bank has other tensors than the weights
        recipe = (ckpt / "recipe.toml").read_text()
        assert 'write = "attend"' in recipe
        (ckpt / "recipe.toml").write_text(recipe.replace('write = "attend"', 'write = "delta"'))
        write_state_file(ckpt, state)
    elif how == "memory window":  # re-signed: a delta-only window on a slot-bank checkpoint (the recipe refuses it)
        recipe = (ckpt / "recipe.toml").read_text()
        assert "key_window = 1" in recipe
        (ckpt / "recipe.toml").write_text(recipe.replace("key_window = 1", "key_window = 4"))
        write_state_file(ckpt, state)
    elif how == "recipe":  # re-signed: only the recipe checks can refuse it
        (ckpt / "recipe.toml").write_text(f"[model]\nd_model = {'{ x = 1 }' if n % 2 else 'inf'}\n")
        write_state_file(ckpt, state)
    else:  # re-signed: a weights file whose header is noise
        (ckpt / "model.safetensors").write_bytes(len(noise).to_bytes(8, "little") + noise)
        write_state_file(ckpt, state)
    return 1


@settings(FUZZ, max_examples=60)
@given(case=damage())
def test_damaged_checkpoints(cli, tmp_path, gen_run, case):
    import shutil

    run = case_dir(tmp_path) / "run"
    shutil.copytree(gen_run, run)
    ckpt = run / "checkpoints" / "step_00000020"
    problems = apply_damage(ckpt, *case)
    check(cli("generate", run, "--prompt", "Mary", "--max-new-tokens", "2"), problems)


@pytest.mark.parametrize("how, named", [
    ("memory option", ["memory.slot_keys"]),  # tensors the weights lack: the refusal names them
    ("memory choice", ["memory.write", '"attend" | "compete" | "delta"']),  # a value the schema does not know
    ("memory kind", ["memory.in_forget_gate"]),  # the associative bank on slot-bank weights: names what differs
    ("memory window", ["memory.key_window = 4", 'memory.write = "delta" only']),  # a delta-only option
])
def test_memory_options_in_a_checkpoint_recipe_are_one_line(cli, tmp_path, gen_run, how, named):
    """The memory damage kinds above, spelled out: the refusal names the option, so the user sees what differs."""
    import shutil

    run = case_dir(tmp_path) / "run"
    shutil.copytree(gen_run, run)
    problems = apply_damage(run / "checkpoints" / "step_00000020", how, "recipe.toml", 0, b"x")
    res = cli("generate", run, "--prompt", "Mary")
    check(res, problems)
    assert all(text in res.err for text in named)


@pytest.mark.parametrize("sets, problems", [
    (["memory.key_window=3"], 1),  # delta-only windows on the slot bank
    (["memory.value_window=2", "memory.key_window=2"], 2),
    (["memory.write=delta", "memory.segment_len=4", "memory.value_window=5"], 1),  # wider than a segment
    (["memory.write=delta", "memory.segment_len=4", "memory.key_window=9", "memory.value_window=9"], 2),
])
def test_memory_windows_out_of_place_are_one_line_each(cli, tmp_path, sets, problems):
    args = [a for kv in sets for a in ("--set", kv)]
    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"
    check(cli("finetune", tiny, *args, "--print-recipe"), problems)


def test_the_fuzzers_cover_every_recipe_key_with_a_defect():
    assert all(len(defects_for(k)) >= 2 for k in FIELDS)


@settings(FUZZ, max_examples=8)
@given(case=damage(), command=st.sampled_from(["eval", "inspect-memory"]))
def test_damaged_checkpoints_refused_by_every_reader(cli, tmp_path, gen_run, case, command):
    """eval and inspect-memory read the same checkpoints as generate: the same damage is one line, exit 2."""
    import shutil

    run = case_dir(tmp_path) / "run"
    shutil.copytree(gen_run, run)
    problems = apply_damage(run / "checkpoints" / "step_00000020", *case)
    check(cli(command, run, "--out", str(run.parent / "out")), problems)
    assert not (run.parent / "out").exists()  # nothing written for a refused checkpoint


@pytest.mark.parametrize("sets", [
    ["finetune.facts_start=2", "finetune.stages=[1, 2]"],  # the fact curriculum needs a single stage
    ["finetune.facts_start=2", "finetune.format=\"jsonl\""],  # and rows that list their facts
])
def test_fact_curriculum_conflicts_are_one_line(cli, tmp_path, sets):
    args = [a for s in sets for a in ("--set", s)]
    check(cli("finetune", TINY, *args, "--out", str(case_dir(tmp_path) / "run")), 1)


# ---------------------------------------------------------------------- fact annotations in data files


JSON_SCALARS = st.none() | st.booleans() | st.integers(-3, 12) | st.floats(allow_nan=True) | st.text(max_size=3)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=10)


@FUZZ
@given(spans=JSON_VALUES, support=JSON_VALUES)
def test_fact_annotations_of_any_shape_never_raise(spans, support):
    """fact_spans / support come from data files a stranger may write: whatever JSON they hold, lm2 eval's support
    split reads True / False only from a non-empty list of in-range integer indices, and None from anything else."""
    from lm2cli.data.babilong import support_is_last_fact

    got = support_is_last_fact({"input": "x", "question": "q", "target": "t", "fact_spans": spans,
                                "support": support})
    valid = (isinstance(spans, list) and spans and isinstance(support, list) and support
             and all(type(i) is int and 0 <= i < len(spans) for i in support))
    assert got is (None if not valid else max(support) == len(spans) - 1)


@pytest.fixture(scope="module")
def delta_run(tmp_path_factory, gen_run):
    """gen_run's tokenizer under an associative (delta-rule) bank: the memory whose read inspect-memory splits
    per fact."""
    from lm2cli.data.tokenizer import Tokenizer
    from tests.generation.test_cli_generate import save_run

    tok = Tokenizer.load(next(gen_run.glob("checkpoints/step_*/tokenizer.model")), answer_token="<ans>")
    return save_run(tmp_path_factory.mktemp("fuzz-delta") / "run", tok, ["memory.write=delta"])


FACTS_TEXT = "Mary went to the kitchen. John took the apple. Mary went to the garden."
STORY = FACTS_TEXT + " Daniel went to the office." * 12  # the facts lie in written segments at the answer
FACT_EDGES = [0, 5, 25, 26, 46, 47, len(FACTS_TEXT), len(STORY)]  # sentence and word edges, the text's end


@settings(FUZZ, max_examples=10)
@given(spans=st.lists(st.lists(st.sampled_from(FACT_EDGES + [-1, 999]), min_size=2, max_size=2), max_size=4),
       support=st.lists(st.integers(-2, 5), max_size=3))
def test_fact_spans_of_a_stranger_s_row_in_inspect_memory(cli, tmp_path, delta_run, spans, support):
    """A BABILong row's fact_spans / support are a stranger's: overlapping, unordered or repeated spans still
    give one fact number per token and a per-fact read; spans outside the text or reversed end in one line."""
    root = case_dir(tmp_path) / "bl"
    (root / "qa1").mkdir(parents=True)
    row = {"input": STORY, "question": "Where is Mary?", "target": "garden", "fact_spans": spans,
           "support": support}
    (root / "qa1" / "1k.json").write_text(json.dumps([row]))
    res = cli("inspect-memory", delta_run, "--babilong", f"{root}:qa1:1k", "--json", "--out", str(root / "out"))
    if all(0 <= a < b <= len(STORY) for a, b in spans):
        assert res.code == 0, res.err
        per_fact = json.loads(res.out)["layers"]["0"]["per_fact"]
        assert all(0 <= f["fact"] < len(spans) for f in per_fact) and bool(per_fact) == bool(spans)
    else:
        check(res, 1)


# ---------------------------------------------------------------------- BABILong directories for lm2 finetune

BAD_BABILONG_FILES = {
    "control characters in a file name": ("qa1/\x1b[31m0k.json", '[{"input": "a", "question": "b", "target": "c"}]'),
    "a file that is not a length": ("qa1/notes.json", "[]"),
    "not JSON": ("qa1/0k.json", "not json"),
    "not a list of rows": ("qa1/0k.json", '{"rows": 3}'),
    "a row without its target": ("qa1/0k.json", '[{"input": "a", "question": "b"}]'),
    "no file for the task": ("qa2/0k.json", '[{"input": "a", "question": "b", "target": "c"}]'),
}


@pytest.mark.parametrize("key", ["finetune.replay_data", "finetune.data"])
@pytest.mark.parametrize("case", [*BAD_BABILONG_FILES, "missing directory"])
def test_bad_babilong_directories_are_one_line(cli, tmp_path, gen_run, key, case):
    """Training rows from a stranger (finetune.data, and the replayed rows): one line, exit 2, nothing trained."""
    import shutil

    d = case_dir(tmp_path)
    (d / "data").mkdir()
    shutil.copy(gen_run / "checkpoints" / "step_00000020" / "tokenizer.model", d / "data" / "tokenizer.model")
    good = d / "good" / "qa1"
    good.mkdir(parents=True)
    (good / "0k.json").write_text('[{"input": "Mary went to the kitchen.", "question": "Where is Mary?", '
                                  '"target": "kitchen"}]')
    bad = d / "bad"
    if case != "missing directory":
        name, text = BAD_BABILONG_FILES[case]
        (bad / name).parent.mkdir(parents=True)
        (bad / name).write_text(text)
    data = {"finetune.data": good.parent, "finetune.val_data": good.parent, key: bad}
    sets = [a for k, v in data.items() for a in ("--set", f"{k}={json.dumps(str(v))}")]
    res = cli("finetune", TINY, "--set", f"data.dir={json.dumps(str(d / 'data'))}", *sets, "--set", "train.steps=1",
              "--out", str(d / "run"))
    check(res, 1)
    assert str(bad) in res.err, res.err  # the error names the stranger's directory
    assert "\x1b" not in res.err and not (d / "run" / "checkpoints").exists()


@pytest.mark.parametrize("how,value", defects_for("eval.dtype"))
@pytest.mark.parametrize("where", ["--set", "recipe"])
def test_eval_dtype_defects_are_one_line(cli, tmp_path, gen_run, how, value, where):
    """eval.dtype picks the evaluation's precision: anything but auto / fp32 / bf16, from --set or from a
    stranger's recipe, is one `error:` line and exit 2 before a model is loaded."""
    if where == "--set":
        check(cli("eval", gen_run, "--set", f"eval.dtype={value}"), 1)
    else:
        recipe = case_dir(tmp_path) / "r.toml"
        recipe.write_text(f'[output]\ndir = "{gen_run}"\n\n[eval]\ndtype = {value}\n')
        check(cli("eval", recipe), 1)


# A stranger's pipeline.toml for recipes/babilong/reproduce.py: task groups and their base settings. Each case holds
# the number of problems the runner must report, one `error:` line each, before any stage runs.
BAD_TASK_GROUPS = [
    ('task_groups = [["qa1"], ["qa9"]]', 1),
    ('task_groups = [["qa1"], []]', 1),
    ('task_groups = [["qa1"], ["qa1"]]', 1),
    ('task_groups = [["qa1"], ["qa9"]]\ngroup_base_set = { qa7 = ["x=1"] }', 2),
    ('task_groups = "qa1"', 1),
    ('task_groups = [[1]]', 1),
    ('group_base_set = { qa1 = "x" }', 1),
    ('group_base_set = { "qa1+qa2" = ["x=1"] }', 1),
]


@pytest.mark.parametrize("plan,problems", BAD_TASK_GROUPS)
def test_a_stranger_s_task_groups_are_one_line_each(tmp_path, plan, problems):
    import shutil
    import subprocess
    import sys

    recipes = tmp_path / "recipes"
    shutil.copytree(REPO / "recipes" / "babilong" / "one-backbone" / "smoke", recipes)
    text = (recipes / "pipeline.toml").read_text()
    (recipes / "pipeline.toml").write_text(text.replace('tasks = ["qa1"]\n', f'tasks = ["qa1"]\n{plan}\n'))
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "babilong" / "reproduce.py"), "--recipes",
                           str(recipes), "--work", str(tmp_path / "work")], capture_output=True, text=True,
                          timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in proc.stderr and proc.returncode == 2 and len(errors) == problems, proc.stderr
    assert not (tmp_path / "work").exists()  # refused before anything ran
