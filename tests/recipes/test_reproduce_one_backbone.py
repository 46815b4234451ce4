"""reproduce.py --smoke --recipes recipes/babilong/one-backbone: the plan features the qa1 pilots' protocol needs
(the base fine-tune's own sets, one base per seed shared by the two vanillas and the RMT, the LM2's own base with its
extra --set, replayed 0k rows, a continued long fine-tune) run as printed lm2 commands, each stage from the one
before."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import BABILONG, load_reproduce, plan_problems

REPO = BABILONG.parents[1]
PLAN = BABILONG / "one-backbone"
MODELS = ["vanilla-window", "lm2-delta", "rmt", "vanilla"]
FROM_SHARED_BASE = ["rmt", "vanilla"]  # no base of their own: the windowed vanilla's


def run_smoke(work: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BABILONG / "reproduce.py"), "--smoke", "--recipes", str(PLAN),
                           "--work", str(work), "--results", str(work / "results.md"), *extra],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("one-backbone") / "work"
    proc = run_smoke(work)
    commands = dict(re.findall(r"^\[([^\]]+)\] \$ lm2 (.*)$", proc.stdout, flags=re.M))
    return work, proc, commands


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    root = run_dir / "checkpoints"
    return load_file(root / (root / "latest").read_text().strip() / "model.safetensors")


def sets_of(command: str) -> dict[str, str]:
    return dict(re.findall(r"--set '?([a-z_.]+)=(.*?)'?(?= --|$)", command))


@pytest.mark.slow
def test_two_bases_then_two_long_fine_tunes_per_model(run):
    work, _, commands = run
    stages = [*commands]
    assert stages[:7] == ["tokenize", "babilong-train", "babilong-val", "babilong-test", "babilong-base-train",
                          "babilong-base-val", "babilong-replay"]
    long = [f"seed7/{part}/{{}}" for part in ("finetune-part1", "finetune")]
    assert stages[7:] == ["seed7/finetune-base/vanilla-window", *(s.format("vanilla-window") for s in long),
                          "seed7/finetune-base/lm2-delta", *(s.format("lm2-delta") for s in long),
                          *(s.format("rmt") for s in long), *(s.format("vanilla") for s in long), "seed7/eval",
                          "seed7/inspect-memory"]
    shared, own = (sets_of(commands[f"seed7/finetune-base/{m}"]) for m in ("vanilla-window", "lm2-delta"))
    for base in (shared, own):
        assert base["finetune.data"].endswith('babilong/base-train"') and "finetune.replay_data" not in base
    assert own["finetune.stages"] == "[16]" and shared["finetune.stages"] == "[4]"  # 16 x 8 = 4 x 32 tokens
    assert "attention.window" not in own and "memory.segment_len" not in own  # the recipe's own 8 and 8
    for m in MODELS:
        first, second = sets_of(commands[f"seed7/finetune-part1/{m}"]), sets_of(commands[f"seed7/finetune/{m}"])
        base = "lm2-delta" if m == "lm2-delta" else "vanilla-window"
        assert first["finetune.init_from"] == f'"{work}/seed7/finetune-base/{base}"'
        assert "attention.window" not in first and "memory.segment_len" not in first
        assert second["finetune.init_from"] == f'"{work}/seed7/finetune-part1/{m}"'
        assert second["finetune.init_checkpoint"] == '"latest"' and "finetune.init_checkpoint" not in first
        for s in (first, second):
            assert s["finetune.data"].endswith('babilong/train"')
            assert s["finetune.replay_data"].endswith('babilong/replay"')
    reproduce = load_reproduce()
    for m, base in (("lm2-delta", "lm2-delta"), ("rmt", "vanilla-window"), ("vanilla", "vanilla-window")):
        record = json.loads((work / "stages" / f"seed7__finetune-part1__{m}.json").read_text())
        assert record["inputs"]["base_weights"] == reproduce.run_weights(work / f"seed7/finetune-base/{base}")


@pytest.mark.slow
def test_replayed_rows_are_their_own_set_and_trained_on(run):
    work, proc, _ = run
    meta = json.loads((work / "babilong" / "replay" / "meta.json").read_text())
    assert meta["seed"] == 4321 and meta["rows"] == {"qa1": {"0k": 4}}
    assert proc.stdout.count("of them 4 replayed from") == 2 * len(MODELS)  # every long fine-tune, no base


@pytest.mark.slow
def test_results_name_the_shared_base_and_the_continuation(run):
    work, _, _ = run
    text = (work / "results.md").read_text()
    assert "<!-- reproduce:one-backbone-smoke:start -->\n## Results: one-backbone smoke run" in text  # its own
    for m in FROM_SHARED_BASE:
        assert f"* {m}: no base of its own; its long fine-tune starts from vanilla-window's base weights" in text
    assert "* lm2-delta: its base fine-tune adds --set finetune.stages=[16]" in text
    assert "* replay: 4 training-side samples per task at 0k (babilong.seed 4321)" in text
    assert "* then continued 1 time(s) from the newest run" in text
    results = json.loads((work / "seed7" / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == MODELS


@pytest.mark.slow
def test_two_jobs_run_the_same_stages_to_the_same_weights_and_numbers(run, tmp_path: Path):
    """--jobs 2: the long fine-tunes of the models sharing a base run side by side; with the same threads per
    stage every model's weights are bitwise those of the one-job run, and so are the evaluation's numbers. Each
    stage's output goes to its log; the wall-time table keeps the plan's order."""
    work, _, commands = run
    proc = run_smoke(tmp_path / "work", "--jobs", "2")
    two = tmp_path / "work"
    started = re.findall(r"^\[([^\]]+)\] \$ lm2 .*\(output: (.*)\)$", proc.stdout, flags=re.M)
    assert sorted(name for name, _ in started) == sorted(commands)
    for name, log in started:
        assert Path(log).is_file() and Path(log).read_text().startswith("$ lm2 "), name
        assert f"[{name}] finished in " in proc.stdout
    for m in MODELS:
        one_w, two_w = final_weights(work / "seed7/finetune" / m), final_weights(two / "seed7/finetune" / m)
        assert one_w.keys() == two_w.keys() and all((one_w[k] == two_w[k]).all() for k in one_w), m
    cells = [json.loads((w / "seed7/eval/results.json").read_text())["babilong"]["cells"] for w in (work, two)]
    assert [[{k: v for k, v in c.items() if k != "samples_per_s"} for c in cs] for cs in cells] == [
        [{k: v for k, v in c.items() if k != "samples_per_s"} for c in cells[0]]] * 2
    text = (two / "results.md").read_text()
    wall = text.split("### Wall time of every stage", 1)[1]
    assert [line.split("|")[1].strip() for line in wall.splitlines()[4:4 + len(commands)]] == [*commands]
    n = len(commands)
    assert re.search(rf"This invocation ran {n} of the {n} stages in [\d.]+ s \([\d.]+ min\) end to end, 2 at a "
                     r"time \(--jobs 2\)", text)


def test_the_lm2_sees_8_tokens_and_writes_every_8_on_the_vanillas_rows():
    """The plan's LM2 answers through its memory (8-token window and segments, docs/results.md twelfth and
    thirteenth passes) and still trains on the vanillas' rows: its stages x segment_len budgets equal theirs."""
    reproduce = load_reproduce()
    for where in (PLAN, PLAN / "smoke"):
        recipes = reproduce.load_recipes({m: where / f"{m}.toml" for m in MODELS})
        lm2 = recipes["lm2-delta"]
        assert lm2.attention.window == lm2.memory.segment_len == 8, where
        assert reproduce.fairness_problems(recipes) == [], where
        plan, _ = reproduce.load_plan(where, quick=False)
        base_stages = [s for s in plan.base_set + plan.base_set_of["lm2-delta"] if s.startswith("finetune.stages")]
        shared = [s for s in plan.base_set if s.startswith("finetune.stages")]
        budget = int(base_stages[-1].split("[")[1].rstrip("]")) * 8
        assert budget == int(shared[-1].split("[")[1].rstrip("]")) * recipes["vanilla"].memory.segment_len, where


def test_a_shared_base_must_be_trained_first_by_another_model(tmp_path: Path):
    reproduce = load_reproduce()
    plan, _ = reproduce.load_plan(PLAN / "smoke", quick=False)
    cases = {
        "{ lm2-delta = 'vanilla' }": "plan.base_from.lm2-delta = 'vanilla': 'vanilla' must come before",
        "{ lm2-delta = 'lm2-delta' }": "name another model of plan.models",
        "{ rmt2 = 'vanilla' }": "plan.base_from: 'rmt2' is not one of plan.models",
        "{ lm2-delta = 'vanilla', vanilla = 'vanilla-window' }": "name another model",
        "{ lm2-delta = 3 }": "base_from = {'lm2-delta': 3} should be a table of str values",
    }
    for value, message in cases.items():
        problems = plan_problems(reproduce, tmp_path, f"[plan]\nmodels = {json.dumps(MODELS)}\nbase_set = ['x=1']\n"
                                                      f"base_from = {value}\n", PLAN / "smoke")
        assert any(message in p for p in problems), (value, problems)
    no_base = reproduce.Plan(models=MODELS, inspect_model="lm2-delta", base_from={"lm2-delta": "vanilla-window"})
    with pytest.raises(reproduce.PipelineError, match="the plan has no base fine-tune"):
        reproduce.recipe_paths(PLAN / "smoke", no_base)
    (tmp_path / "pipeline.toml").write_text("[plan]\ncontinue_sets = [['train.steps=2'], [3]]\n")
    with pytest.raises(reproduce.PipelineError, match="should be a list of lists of str values"):
        reproduce.load_plan(tmp_path, quick=False)


def test_a_base_below_base_min_em_stops_the_plan_before_its_long_fine_tunes(tmp_path: Path):
    reproduce = load_reproduce()
    root = tmp_path / "base" / "checkpoints"
    for name, em in (("step_00000100", 0.703125), ("step_00000200", 0.98)):
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.json").write_text(json.dumps({"step": int(name[5:]),
                                                                    "val": {"val_loss": 0.4, "val_em": em}}))
    (root / "latest").write_text("step_00000200")
    (root / "best").write_text("step_00000100\n")  # the long fine-tune starts from the best: that one is checked
    reproduce.check_base(tmp_path / "base", 0.0, "off")  # 0 = no check
    with pytest.raises(reproduce.PipelineError, match=r"seed 1: the base has 70\.3% validation exact match at "
                                                      r"step 100 \(best of .*base\), below plan.base_min_em = 0.95"):
        reproduce.check_base(tmp_path / "base", 0.95, "seed 1: the base")
    (root / "best").write_text("step_00000200")
    reproduce.check_base(tmp_path / "base", 0.95, "seed 1: the base")
    plan, _ = reproduce.load_plan(PLAN, quick=True)
    assert plan.base_min_em == 0.95
    for bad in ("2.0", "-0.5"):
        (tmp_path / "pipeline.toml").write_text(f"[plan]\nbase_min_em = {bad}\n")
        with pytest.raises(reproduce.PipelineError, match="base_min_em = .* should be an exact match between 0 and 1"):
            reproduce.load_plan(tmp_path, quick=False)


class RecordingStages:
    """Stages that record each command instead of running lm2."""

    def __init__(self):
        self.argv: dict[str, list[str]] = {}

    def run(self, name, argv, inputs=None, resume_dir=None, derived=False, before=None):
        self.argv[name] = argv


def test_a_model_s_own_base_takes_its_extra_sets_after_the_shared_ones(tmp_path: Path, monkeypatch):
    reproduce = load_reproduce()
    monkeypatch.setattr(reproduce, "run_weights", lambda run_dir: "sha")
    monkeypatch.setattr(reproduce, "check_base", lambda *args: None)
    plan = reproduce.Plan(models=MODELS, base_set=["train.steps=5", "attention.window=128"], pretrain=False,
                          base_from={"vanilla": "vanilla-window", "rmt": "vanilla-window"},
                          base_set_of={"lm2-delta": ["attention.window=8", "memory.segment_len=8"]})
    stages, lay = RecordingStages(), reproduce.Layout(tmp_path)
    for model in MODELS:
        for task in reproduce.ModelChain(stages, plan, model, PLAN / f"{model}.toml", 7, lay).tasks([]):
            task.run()
    assert [*stages.argv] == ["seed7/finetune-base/vanilla-window", "seed7/finetune/vanilla-window",
                              "seed7/finetune-base/lm2-delta", "seed7/finetune/lm2-delta", "seed7/finetune/rmt",
                              "seed7/finetune/vanilla"]
    own, shared = (sets_of(" ".join(stages.argv[f"seed7/finetune-base/{m}"])) for m in ("lm2-delta", "vanilla-window"))
    assert own["attention.window"] == "8" and own["memory.segment_len"] == "8" and own["train.steps"] == "5"
    assert shared["attention.window"] == "128" and "memory.segment_len" not in shared
    long = sets_of(" ".join(stages.argv["seed7/finetune/lm2-delta"]))
    assert long["finetune.init_from"] == f'"{tmp_path}/seed7/finetune-base/lm2-delta"'
    assert "attention.window" not in long  # the long fine-tune runs the recipe's own window

    cases = {"{ rmt2 = ['x=1'] }": "plan.base_set_of.rmt2: 'rmt2' is not one of plan.models",
             "{ vanilla = ['x=1'] }": "'vanilla' trains no base of its own (plan.base_from.vanilla",
             "{ lm2-delta = 'x=1' }": "base_set_of = {'lm2-delta': 'x=1'} should be a table of lists of str values"}
    for value, message in cases.items():
        problems = plan_problems(reproduce, tmp_path, f"[plan]\nmodels = {json.dumps(MODELS)}\nbase_set = ['x=1']\n"
                                                      f"base_from = {{ vanilla = 'vanilla-window' }}\n"
                                                      f"base_set_of = {value}\n", PLAN)
        assert any(message in p for p in problems), (value, problems)
