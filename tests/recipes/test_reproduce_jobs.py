"""reproduce.py --jobs N: stages run side by side as soon as what they start from exists; one job keeps the plan's
order; a failure stops new stages and is the run's error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def test_an_interrupt_stops_the_running_stages_waits_for_them_and_goes_on():
    """Ctrl-C (or kill -INT of the runner alone): `interrupt` is called once — it stops the running stages —,
    they are waited for, nothing new starts, and the KeyboardInterrupt reaches the caller."""
    reproduce, log = load_reproduce(), []
    running, release = threading.Barrier(3), threading.Event()

    def stage(name):
        log.append(("start", name))
        running.wait(60)  # generous: a loaded CI machine can hold a thread back for seconds
        release.wait(60)
        log.append(("end", name))

    def interrupt():
        log.append(("interrupt", ""))
        release.set()

    def press_ctrl_c():
        running.wait(60)  # both stages are running
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: to the process; Python raises it in the main thread

    tasks = [reproduce.Task(n, needs, lambda n=n: stage(n)) for n, needs in
             {"base-a": [], "base-b": [], "long-a": ["base-a"]}.items()]
    # Python's own handler, whatever this process inherited: a shell starts background jobs with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=press_ctrl_c).start()
        with pytest.raises(KeyboardInterrupt):
            reproduce.run_tasks(tasks, jobs=2, interrupt=interrupt)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert log[:2] == [("start", "base-a"), ("start", "base-b")] and log[2] == ("interrupt", "")
    assert sorted(log[3:]) == [("end", "base-a"), ("end", "base-b")]  # waited for; long-a never started


def test_interrupt_sends_sigint_to_every_running_stage(tmp_path):
    """A training stage given SIGINT saves a checkpoint and stops (lm2's trainer); the runner forwards it."""
    reproduce = load_reproduce()
    stages = reproduce.Stages(tmp_path, log=lambda *a, **k: None, jobs=2)
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGINT, lambda *a: sys.exit(7))\n"
             "print('ready', flush=True)\n"
             "time.sleep(30)\n")
    procs = [subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
        stages._running.add(proc)
    stages.interrupt()
    assert [proc.wait(10) for proc in procs] == [7, 7]
