"""reproduce.py --jobs N: stages run side by side as soon as what they start from exists; one job keeps the plan's
order; a failure stops new stages and is the run's error."""

from __future__ import annotations

import threading
import time

import pytest

from .conftest import load_reproduce


def tracked_tasks(reproduce, spec: dict[str, list[str]], log: list, fail: str = "", hold: float = 0.05):
    """Tasks named by `spec` (name -> needs) that log their start and end; `fail` raises a PipelineError."""
    live = {"now": 0, "most": 0}
    lock = threading.Lock()

    def body(name):
        with lock:
            log.append(("start", name))
            live["now"] += 1
            live["most"] = max(live["most"], live["now"])
        time.sleep(hold)
        with lock:
            live["now"] -= 1
            log.append(("end", name))
        if name == fail:
            raise reproduce.PipelineError(f"stage {name} failed")

    return [reproduce.Task(n, needs, lambda n=n: body(n)) for n, needs in spec.items()], live


SPEC = {"tokenize": [], "sets": ["tokenize"], "base-a": ["sets"], "base-b": ["sets"], "long-a": ["base-a"],
        "long-c": ["base-a"], "long-b": ["base-b"], "eval": ["long-a", "long-b", "long-c"]}


def test_one_job_runs_the_plan_in_order():
    reproduce, log = load_reproduce(), []
    tasks, live = tracked_tasks(reproduce, SPEC, log, hold=0.0)
    reproduce.run_tasks(tasks, jobs=1)
    assert [n for kind, n in log if kind == "start"] == list(SPEC) and live["most"] == 1


@pytest.mark.parametrize("jobs", [2, 3])
def test_several_jobs_run_side_by_side_and_never_before_what_they_need(jobs):
    reproduce, log = load_reproduce(), []
    tasks, live = tracked_tasks(reproduce, SPEC, log)
    reproduce.run_tasks(tasks, jobs=jobs)
    assert sorted(n for kind, n in log if kind == "end") == sorted(SPEC)
    assert live["most"] == jobs  # three long fine-tunes can run at once after the bases
    for name, needs in SPEC.items():
        start = log.index(("start", name))
        assert all(log.index(("end", need)) < start for need in needs), name


def test_a_failure_starts_nothing_new_lets_the_running_finish_and_is_raised():
    reproduce, log = load_reproduce(), []
    tasks, _ = tracked_tasks(reproduce, SPEC, log, fail="base-a")
    with pytest.raises(reproduce.PipelineError, match="stage base-a failed"):
        reproduce.run_tasks(tasks, jobs=2)
    started = [n for kind, n in log if kind == "start"]
    assert started == ["tokenize", "sets", "base-a", "base-b"] and ("end", "base-b") in log


def test_a_need_that_names_no_task_is_a_bug_caught_before_anything_runs():
    reproduce, log = load_reproduce(), []
    tasks, _ = tracked_tasks(reproduce, {"a": [], "b": ["nope"]}, log)
    with pytest.raises(RuntimeError, match="unknown tasks \\['nope'\\]"):
        reproduce.run_tasks(tasks, jobs=2)
    assert log == []


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_jobs_must_be_a_whole_number_of_stages(bad, capsys):
    reproduce = load_reproduce()
    with pytest.raises(SystemExit) as e:
        reproduce.parse_args(["--jobs", bad])
    assert e.value.code == 2 and "is not a whole number of stages, 1 or more" in capsys.readouterr().err
