"""reproduce.py's task groups (plan.task_groups): per-task or multi-task models from one plan. Each group trains
every model of the plan on its own tasks and is evaluated on them; the results merge the groups, with the
qa1-qa5 average computed across them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import BABILONG, load_reproduce, plan_problems

REPO = BABILONG.parents[1]
SMOKE = BABILONG / "one-backbone" / "smoke"
GROUPS = ["qa1+qa2", "qa3+qa4+qa5"]
PLAN = """
[plan]
models = ["vanilla-window", "lm2-delta"]
base_set_of = { lm2-delta = ["finetune.stages=[192]"] }
inspect_model = "lm2-delta"
inspect_task = "qa3"
inspect_length = "1k"
tasks = ["qa1", "qa2", "qa3", "qa4", "qa5"]
task_groups = [["qa1", "qa2"], ["qa3", "qa4", "qa5"]]
group_base_set = { "qa3+qa4+qa5" = ["finetune.facts_start=4"] }
train_lengths = ["1k"]
train_samples = 3
val_samples = 2
test_lengths = ["0k", "1k"]
test_samples = 2
seeds = [7]
pretrain = false
base_samples = 6
base_val_samples = 2
base_lengths = ["0k"]
base_set = ["finetune.stages=[48]", "finetune.facts_start=2", "train.steps=2"]
finetune_set = ["train.steps=2"]
eval_set = ['eval.run=["babilong"]']
inspect_args = ["--generate", "2", "--top-tokens", "8"]
"""


def sets_of(command: str) -> dict[str, str]:
    return dict(re.findall(r"--set '?([a-z_.]+)=(.*?)'?(?= --|$)", command))


def stage_lines(stdout: str, kind: str) -> dict[str, str]:
    """stage name -> its command, for the stages the runner ran (kind "$") or found done ("done earlier")."""
    pattern = r"\$" if kind == "$" else r"done earlier \([0-9.]+ s\):"
    return dict(re.findall(rf"^\[([^\]]+)\] {pattern} lm2 (.*?)(?:   \(output: .*\))?$", stdout, flags=re.M))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """First one task group alone (--group qa1+qa2), then the whole plan in the same WORK."""
    root = tmp_path_factory.mktemp("groups")
    recipes = root / "recipes"
    shutil.copytree(SMOKE, recipes)
    (recipes / "pipeline.toml").write_text(PLAN)
    work = root / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    outputs = []
    for extra, results in ((["--group", "qa1+qa2"], "results-group.md"), ([], "results.md")):
        proc = subprocess.run([sys.executable, str(BABILONG / "reproduce.py"), "--recipes", str(recipes), "--work",
                               str(work), "--results", str(work / results), "--jobs", "2", *extra],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    group_run, whole_run = outputs
    commands = {**stage_lines(group_run, "$"), **stage_lines(whole_run, "$")}
    return work, commands, outputs


@pytest.mark.slow
def test_a_group_s_run_trains_only_that_group_and_the_whole_plan_reuses_its_stages(run):
    work, _, (group_run, whole_run) = run
    ran = stage_lines(group_run, "$")
    assert ran and all(name in ("tokenize", "qa1+qa2") or name.startswith(("babilong-", "seed7/qa1+qa2/"))
                       for name in ran), sorted(ran)
    assert "seed7/qa1+qa2/eval" in ran and not any("inspect-memory" in name for name in ran)  # qa3's group
    assert sets_of(ran["babilong-test"])["babilong.tasks"] == '["qa1","qa2","qa3","qa4","qa5"]'  # the whole plan's
    reused = stage_lines(whole_run, "done earlier")
    assert set(reused) == set(ran), sorted(set(ran) ^ set(reused))  # nothing the group's run finished runs again
    assert not set(reused) & set(stage_lines(whole_run, "$"))
    text = (work / "results-group.md").read_text()
    assert "<!-- reproduce:recipes-full-qa1+qa2:start -->" in text
    assert "## Results: recipes full, task group qa1+qa2 only run" in text
    assert "(not inspected: plan.inspect_task qa3 belongs to a task group this run left out with --group)" in text
    assert "| vanilla-window [qa1+qa2] | vanilla |" not in text  # one group: no group tag on its rows
    assert "qa3" not in text.split("### Per task", 1)[1].split("###", 1)[0]


def test_group_and_set_options_are_checked_before_any_stage_runs(tmp_path: Path, capsys):
    reproduce = load_reproduce()
    recipes = tmp_path / "recipes"
    shutil.copytree(SMOKE, recipes)
    (recipes / "pipeline.toml").write_text(PLAN)
    cases = {
        ("--group", "qa1"): "error: --group qa1: not a task group of the plan; the groups are qa1+qa2, qa3+qa4+qa5",
        ("--set", "tasks"): "error: --set tasks: expected KEY=VALUE with KEY a key of pipeline.toml's [plan]",
        ("--set", "task=1"): "error: --set: unknown key 'task'; valid keys: models,",
        ("--set", "test_samples=many"): "error: --set: test_samples = 'many' should be a int",
        ("--set", "base_min_em=2"): f"error: {recipes / 'pipeline.toml'} with --set: base_min_em = 2 should be an "
                                    f"exact match between 0 and 1",
    }
    for args, message in cases.items():
        code = reproduce.main(["--recipes", str(recipes), "--work", str(tmp_path / "work"), *args])
        assert code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path / "work").exists()


def test_set_overrides_the_plan_after_its_quick_table():
    reproduce = load_reproduce()
    plan, _ = reproduce.load_plan(BABILONG / "one-backbone", quick=True,
                                  overrides=['test_lengths=["0k", "1k"]', "test_samples = 50", "train_haystack=pg19"])
    assert plan.tasks == ["qa1"]  # [quick] still applies
    assert (plan.test_lengths, plan.test_samples, plan.train_haystack) == (["0k", "1k"], 50, "pg19")


@pytest.mark.slow
def test_each_group_trains_every_model_on_its_own_tasks_and_is_evaluated_on_them(run):
    work, commands, _ = run
    for group in GROUPS:
        tasks = json.dumps(group.split("+")).replace(" ", "")
        for model in ("vanilla-window", "lm2-delta"):
            base, long = (sets_of(commands[f"seed7/{group}/{kind}/{model}"]) for kind in ("finetune-base", "finetune"))
            assert base["finetune.tasks"] == long["finetune.tasks"] == tasks, (group, model)
            assert long["finetune.init_from"] == f'"{work}/seed7/{group}/finetune-base/{model}"'
            if group == "qa3+qa4+qa5":  # its group_base_set, after the plan's base_set (the later --set wins)
                assert commands[f"seed7/{group}/finetune-base/{model}"].endswith(
                    f"--set finetune.facts_start=4 --out {work}/seed7/{group}/finetune-base/{model}")
            else:
                assert base["finetune.facts_start"] == "2"
            assert "finetune.facts_start" not in long  # the long fine-tune has no fact curriculum
        assert sets_of(commands[f"seed7/{group}/eval"])["eval.tasks"] == tasks
    assert "seed7/qa3+qa4+qa5/inspect-memory" in commands  # the group that answers plan.inspect_task


@pytest.mark.slow
def test_the_results_merge_the_groups_with_the_qa1_qa5_average_across_them(run):
    work, _, _ = run
    text = (work / "results.md").read_text()
    assert "Paper-style table (average of the qa1–qa5 accuracies; accuracy % (95 % Wilson interval)" in text
    parts = [json.loads((work / "seed7" / g / "eval" / "results.json").read_text())["babilong"] for g in GROUPS]
    cells = {(c["model"], c["task"], c["length"]): c for p in parts for c in p["cells"]}
    assert {t for _, t, _ in cells} == {"qa1", "qa2", "qa3", "qa4", "qa5"}
    headline = text.split("Paper-style table", 1)[1].split("###", 1)[0]
    for model in ("vanilla-window", "lm2-delta"):
        row = next(line for line in headline.splitlines() if line.startswith(f"| {model} |"))
        for length, shown in zip(["0k", "1k"], row.strip("|").split("|")[1:], strict=True):
            mean = sum(cells[(model, f"qa{i}", length)]["accuracy"] for i in range(1, 6)) / 5
            assert shown.strip().startswith(f"{mean:.1f} ("), (model, length, shown)
    for group in GROUPS:
        assert f"| vanilla-window [{group}] | vanilla |" in text and f"| lm2-delta [{group}] | lm2 |" in text
    assert "* task groups, each trained as its own models and evaluated on its own tasks: qa1+qa2, qa3+qa4+qa5" in text
    assert "* qa3+qa4+qa5: its base fine-tunes add --set finetune.facts_start=4" in text


def test_task_groups_split_the_plan_s_tasks_and_group_base_set_names_a_group(tmp_path: Path):
    reproduce = load_reproduce()
    cases = {
        'task_groups = [["qa1"], []]': "a group is empty",
        'task_groups = [["qa1", "qa7"]]': "'qa7' is not one of plan.tasks",
        'task_groups = [["qa1", "qa2"], ["qa2"]]': "'qa2' is in two groups (qa1+qa2 and qa2)",
        'task_groups = [["qa1"]]': "qa2 in no group",
        'task_groups = [["qa1"], ["qa2"]]\ngroup_base_set = { "qa1+qa2" = ["x=1"] }': "'qa1+qa2' is not a task group; "
                                                                                    "the groups are qa1, qa2",
        'group_base_set = { qa1 = ["x=1"] }': "'qa1' is not a task group; the groups are qa1+qa2",
        'task_groups = [["qa1"], ["qa2"]]\ngroup_base_min_em = { "qa1+qa2" = 0.5 }':
            "plan.group_base_min_em: 'qa1+qa2' is not a task group; the groups are qa1, qa2",
        'group_base_min_em = { "qa1+qa2" = "high" }': "should be a table of float values",
        'task_groups = ["qa1"]': "task_groups = ['qa1'] should be a list of lists of str values",
    }
    for value, message in cases.items():
        head = '[plan]\nmodels = ["vanilla-window", "lm2-delta"]\ninspect_model = "lm2-delta"\ntasks = ["qa1", "qa2"]\n'
        problems = plan_problems(reproduce, tmp_path, f"{head}{value}\n", SMOKE)
        assert any(message in p for p in problems), (value, problems)
    plan = reproduce.Plan(tasks=["qa1", "qa2"], task_groups=[["qa2"], ["qa1"]], group_base_set={"qa1": ["a=1"]})
    layouts = reproduce.group_layouts(plan, tmp_path)
    assert [(lay.group, lay.tasks, lay.base_sets) for lay in layouts] == [("qa2", ["qa2"], []),
                                                                           ("qa1", ["qa1"], ["a=1"])]
    assert layouts[1].finetune(3, "m") == tmp_path / "seed3" / "qa1" / "finetune" / "m"
    one = reproduce.group_layouts(reproduce.Plan(tasks=["qa1", "qa2"], group_base_set={"qa1+qa2": ["b=2"]}),
                                  tmp_path)
    assert [(lay.group, lay.tag(3), lay.base_sets) for lay in one] == [("", "seed3", ["b=2"])]  # the plain layout


def test_a_group_s_base_min_em_replaces_the_plan_s_for_its_bases(tmp_path: Path, monkeypatch):
    """plan.group_base_min_em: a group whose task no model learns to the plan's floor (qa2) checks its bases against
    its own floor; the other groups keep plan.base_min_em, and the error names the key that set the floor."""
    reproduce = load_reproduce()
    monkeypatch.setattr(reproduce, "run_weights", lambda run_dir: "sha")
    plan = reproduce.Plan(models=["vanilla-window"], tasks=["qa1", "qa2", "qa3"], task_groups=[["qa1", "qa2"], ["qa3"]],
                          base_set=["train.steps=5"], pretrain=False, base_min_em=0.95,
                          group_base_min_em={"qa1+qa2": 0.6})
    qa12, qa3 = reproduce.group_layouts(plan, tmp_path)
    assert (qa12.base_min_em, qa3.base_min_em) == (0.6, None)
    for lay in (qa12, qa3):  # both bases reach 72 % on validation, as the qa1 + qa2 bases of the nineteenth pass
        checkpoint = lay.base(7, "vanilla-window") / "checkpoints" / "step_00000005"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 5, "val": {"val_em": 0.72}}))
        (checkpoint.parent / "best").write_text("step_00000005")

    def base_of(lay):
        stages = type("Recording", (), {"run": lambda self, *args, **kwargs: None})()
        chain = reproduce.ModelChain(stages, plan, "vanilla-window", SMOKE / "vanilla-window.toml", 7, lay)
        return next(t for t in chain.tasks([]) if "finetune-base" in t.name)

    base_of(qa12).run()  # 72 % over the group's 60 %
    with pytest.raises(reproduce.PipelineError, match=r"seed7/qa3: the base fine-tune of vanilla-window has 72\.0% "
                                                      r"validation exact match .* below plan\.base_min_em = 0\.95"):
        base_of(qa3).run()
    plan.group_base_min_em["qa1+qa2"] = 0.8
    with pytest.raises(reproduce.PipelineError, match=r"below plan\.group_base_min_em\.qa1\+qa2 = 0\.8: .* or lower "
                                                      r"plan\.group_base_min_em\.qa1\+qa2"):
        base_of(reproduce.group_layouts(plan, tmp_path)[0]).run()
    (tmp_path / "pipeline.toml").write_text('[plan]\ngroup_base_min_em = { "qa1+qa2+qa3+qa4+qa5" = 1.5 }\n')
    with pytest.raises(reproduce.PipelineError, match=r"group_base_min_em\.qa1\+qa2\+qa3\+qa4\+qa5 = 1\.5 should "
                                                      r"be an exact match between 0 and 1"):
        reproduce.load_plan(tmp_path, quick=False)


def test_the_shipped_full_plan_sets_a_floor_for_the_groups_no_model_learns_to_95_percent():
    reproduce = load_reproduce()
    plan, _ = reproduce.load_plan(BABILONG / "one-backbone", quick=False)
    floors = {lay.group: lay.base_min_em for lay in reproduce.group_layouts(plan, BABILONG)}
    assert floors == {"qa1+qa2": 0.8, "qa3": 0.3, "qa4": 0.65, "qa5": None} and plan.base_min_em == 0.95
    assert ("* a long fine-tune starts only from a base with at least 95% validation exact match "
            "(qa1+qa2 80%, qa3 30%, "
            "qa4 65%)") in reproduce.base_lines(plan)  # the results page states the floors
    quick, _ = reproduce.load_plan(BABILONG / "one-backbone", quick=True)  # qa1 alone: the plan's 95 %
    assert [lay.base_min_em for lay in reproduce.group_layouts(quick, BABILONG)] == [None]
    assert not reproduce.task_group_problems(plan) and not reproduce.task_group_problems(quick)


def test_the_shipped_full_plan_trains_every_qa1_qa2_base_11000_steps_and_the_other_groups_5500(tmp_path: Path,
                                                                                               monkeypatch):
    """Equal steps within a group: the qa1 + qa2 bases of both models that train one (the LM2 and the windowed
    vanilla, whose base RMT and the full vanilla start from) get the group's 11,000 steps (twentieth pass)."""
    reproduce = load_reproduce()
    monkeypatch.setattr(reproduce, "run_weights", lambda run_dir: "sha")
    plan, _ = reproduce.load_plan(BABILONG / "one-backbone", quick=False)
    plan.base_min_em, plan.group_base_min_em = 0.0, {}  # no trained checkpoints to check here
    commands = {}
    recording = type("Recording", (), {"run": lambda self, name, argv, *a, **k: commands.setdefault(name, argv)})()
    for lay in reproduce.group_layouts(plan, tmp_path):
        for model in plan.models:
            chain = reproduce.ModelChain(recording, plan, model, BABILONG / "one-backbone" / f"{model}.toml", 1, lay)
            for task in chain.tasks([]):
                if "finetune-base" in task.name:
                    task.run()
    steps = {name: [a for a in argv if a.startswith("train.steps=")][-1] for name, argv in commands.items()}
    expected = {f"seed1/{group}/finetune-base/{model}": "train.steps=11000" if group == "qa1+qa2" else
                "train.steps=5500" for group in ("qa1+qa2", "qa3", "qa4", "qa5")
                for model in ("vanilla-window", "lm2-delta")}
    assert steps == expected
