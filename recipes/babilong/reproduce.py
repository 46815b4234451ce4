"""Reproduce the LM2 paper's comparison (LM2 vs RMT vs vanilla on BABILong) with the lm2 command line.

    python recipes/babilong/reproduce.py            # full run: qa1-qa5, 0k-16k -> docs/results.md
    python recipes/babilong/reproduce.py --quick    # qa1, 0k-4k, 3 seeds -> the quick section of docs/results.md
    python recipes/babilong/reproduce.py --smoke    # tiny recipes and sets: the whole pipeline in seconds
    python recipes/babilong/reproduce.py --recipes recipes/babilong/one-backbone --quick   # the qa1 pilots'
        # protocol: every model's long fine-tune from one windowed-vanilla 0k base per seed (its own section)
    python recipes/babilong/reproduce.py --recipes recipes/babilong/one-backbone --group qa1+qa2   # one task
        # group of the full plan (its own section; the whole plan's later run reuses its stages)

Every stage is an `lm2` command, printed before it runs, exactly as a user would type it (the runner calls
`python -m lm2cli`, the same program). The plan — models, BABILong sets, stage settings, evaluation grid — is
`pipeline.toml` beside the recipes (`--recipes DIR`); each of its settings becomes a `--set` on a printed
command, so the commands alone reproduce a run by hand. A finished stage leaves a record in WORK/stages/ and is
skipped when the same command runs again; an interrupted training stage is continued with `--resume`; an
interrupted evaluation is moved aside (never deleted) and run again. Then the results section of the results
file is rewritten from the evaluations' results.json files (no number is typed in by hand).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: tomli, a core dependency of lm2
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
QA_AVERAGE = "qa1-qa5"  # the leaderboard average `lm2 eval` reports when every task of qa1-qa5 was evaluated


class PipelineError(Exception):
    """Bad input or a failed stage: one `error: ...` line per problem, exit code 2."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or [message]
        super().__init__(message)


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What a run does; `pipeline.toml`'s [plan] table sets these keys and [quick] overrides them for --quick."""

    models: list[str] = field(default_factory=lambda: ["lm2", "lm2-delta", "rmt", "vanilla", "vanilla-window"])
    inspect_model: str = "lm2"     # the model `lm2 inspect-memory` reads, on row 0 of inspect_task at inspect_length
    inspect_task: str = "qa1"
    inspect_length: str = "4k"
    tasks: list[str] = field(default_factory=lambda: ["qa1", "qa2", "qa3", "qa4", "qa5"])
    train_lengths: list[str] = field(default_factory=lambda: ["0k", "1k", "2k", "4k"])
    train_samples: int = 2000      # per task and length (training side)
    val_samples: int = 100         # per task and length (training side, another seed)
    test_lengths: list[str] = field(default_factory=lambda: ["0k", "1k", "2k", "4k", "8k", "16k"])
    test_samples: int = 100        # per task and length (test side: held-out stories and haystack)
    margin: int = 20               # babilong.margin of every set: rows fit their length with the question
    train_haystack: str = "builtin"
    test_haystack: str = "builtin"
    sets_seed: int = 1234          # babilong.seed: the same sets for every training seed
    val_seed_offset: int = 1       # the validation set is built with sets_seed + this
    seeds: list[int] = field(default_factory=lambda: [1234])
    pretrain: bool = True          # false: fine-tune from random weights (finetune.init_from = "")
    pretrain_set: list[str] = field(default_factory=list)   # --set of every `lm2 pretrain`
    base_set: list[str] = field(default_factory=list)       # --set of the base fine-tune; empty = none (below)
    # model -> more --set for that model's own base fine-tune, after base_set (a later --set of a key wins): e.g. an
    # LM2 whose base trains with a short attention window, so that only its memory can answer (docs/results.md,
    # twelfth pass); every other stage keeps the shared settings.
    base_set_of: dict[str, list[str]] = field(default_factory=dict)
    # The base fine-tune's own sets (> 0: base_samples training and base_val_samples validation rows per task at
    # base_lengths, seeds as the fine-tuning sets'); 0: it trains on the fine-tuning set's rows that fit its stage.
    base_samples: int = 0
    # Refuse to go on from a base whose best validation exact match is below this (0 = no check): one 0k base of
    # the qa1 pilots stalled at 70 % with a seed that had reached 96 % on another machine (docs/results.md).
    base_min_em: float = 0.0
    base_val_samples: int = 1000
    base_lengths: list[str] = field(default_factory=lambda: ["0k"])
    # model -> another model of the plan whose base fine-tune's weights this model's long fine-tune starts from
    # (it trains no pretraining or base of its own): an LM2 on the vanilla's backbone differs from it only by the
    # memory (`lm2 finetune` adds the memory modules, fresh, to a vanilla checkpoint).
    base_from: dict[str, str] = field(default_factory=dict)
    finetune_set: list[str] = field(default_factory=list)   # --set of every long `lm2 finetune`
    # More long fine-tunes, each starting from the one before: the --set of each is finetune_set followed by its
    # entry (a later --set of a key wins); the last one is the model's run that lm2 eval reads.
    continue_sets: list[list[str]] = field(default_factory=list)
    # Replay (> 0): replay_samples training-side rows per task at replay_lengths, built with babilong.seed =
    # replay_seed, join the training rows of every long fine-tune (finetune.replay_data), e.g. 0k rows so the
    # long stages keep the base task.
    replay_samples: int = 0
    replay_lengths: list[str] = field(default_factory=lambda: ["0k"])
    replay_seed: int = 4321
    # Per-task or multi-task: groups of plan.tasks, each trained as its own models (every model of the plan, per
    # seed: one multi-task model per group) and evaluated on its own tasks; the results merge them (the qa1-qa5
    # average across groups). Empty: one group of every task. E.g. [["qa1", "qa2"], ["qa3"], ["qa4"], ["qa5"]]:
    # the decision docs/results.md measured (qa2 learned better beside qa1 than alone; sixteenth pass).
    task_groups: list[list[str]] = field(default_factory=list)
    # group name (its tasks joined by "+", e.g. "qa1+qa2"; one group: every task of the plan) -> more --set for the
    # base fine-tunes of that group's models, after base_set and base_set_of (e.g. qa3's fact curriculum must
    # start at 4 facts: no qa3 story can be cut to 2)
    group_base_set: dict[str, list[str]] = field(default_factory=dict)
    # group name -> the base_min_em of that group's base fine-tunes, in place of plan.base_min_em: a task no model
    # learns to 95 % at 0k (qa2, qa3; docs/results.md, sixteenth and nineteenth passes) would stop the plan at
    # every seed, while a check near its measured level still catches a stalled base.
    group_base_min_em: dict[str, float] = field(default_factory=dict)
    eval_set: list[str] = field(default_factory=lambda: ['eval.run=["babilong"]', "eval.retrieval=\"bm25\""])
    inspect_args: list[str] = field(default_factory=lambda: ["--generate", "4"])


def load_plan(recipes: Path, quick: bool, overrides: list[str] | None = None) -> tuple[Plan, Path | None]:
    """The plan of `recipes`/pipeline.toml ([plan], then [quick] for --quick, then the runner's --set KEY=VALUE);
    the built-in Plan when the directory has no pipeline.toml. Returns it and the file read (None: none)."""
    path = recipes / "pipeline.toml"
    plan, where = Plan(), "--set"
    if path.is_file():
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise PipelineError(f"{path}: not valid TOML ({e})") from None
        unknown = set(doc) - {"plan", "quick"}
        if unknown:
            raise PipelineError(f"{path}: unknown table(s) {sorted(unknown)}; valid: [plan], [quick]")
        plan = _apply(plan, doc.get("plan", {}), f"{path} [plan]")
        if quick:
            plan = _apply(plan, doc.get("quick", {}), f"{path} [quick]")
        where = str(path)
    if overrides:
        plan = _apply(plan, plan_overrides(overrides), "--set")
        where = f"{where} with --set"
    for key, value in [("base_min_em", plan.base_min_em),
                       *((f"group_base_min_em.{g}", v) for g, v in plan.group_base_min_em.items())]:
        if not 0.0 <= value <= 1.0:  # an exact match: a bound above 1 would fail every base after training it
            raise PipelineError(f"{where}: {key} = {value!r} should be an exact match between 0 and 1 "
                                f"(0 = no check)")
    return plan, path if path.is_file() else None


def plan_overrides(texts: list[str]) -> dict:
    """`KEY=VALUE` strings (keys of pipeline.toml's [plan]) -> a table; the value is a TOML literal or else a bare
    string, as `lm2 --set` reads it."""
    table = {}
    for text in texts:
        key, sep, raw = (part.strip() for part in text.partition("="))
        if not sep or not key:
            raise PipelineError(f"--set {text}: expected KEY=VALUE with KEY a key of pipeline.toml's [plan], e.g. "
                                f"--set 'test_lengths=[\"0k\",\"1k\"]'")
        try:
            table[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            table[key] = raw
    return table


def _apply(plan: Plan, table: dict, where: str) -> Plan:
    known = {f.name: f for f in fields(Plan)}
    hints = typing.get_type_hints(Plan)
    for key, value in table.items():
        if key not in known:
            raise PipelineError(f"{where}: unknown key {key!r}; valid keys: {', '.join(known)}")
        expected = type(getattr(plan, key))
        if not _is_a(value, expected):
            raise PipelineError(f"{where}: {key} = {value!r} should be a {_type_name(hints[key])}")
        items = value.values() if expected is dict else value if expected is list else ()
        item = typing.get_args(hints[key])[-1] if expected in (list, dict) else None
        if not all(_is_a(v, item) for v in items):
            raise PipelineError(f"{where}: {key} = {value!r} should be a {_type_name(hints[key])}")
    return replace(plan, **table)


def _is_a(value, expected) -> bool:
    """isinstance for the Plan's types, list[str] included; a bool is not an int, an int is a float (TOML's 0)."""
    if typing.get_origin(expected) is list:
        return isinstance(value, list) and all(_is_a(v, typing.get_args(expected)[0]) for v in value)
    if isinstance(value, bool):
        return expected is bool
    return isinstance(value, expected) or (expected is float and isinstance(value, int))


def _type_name(hint, plural: bool = False) -> str:
    """How a Plan key's type reads in an error: int, list of str values, list of lists of str values, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, dict):
        return f"{'list' if origin is list else 'table'}{'s' if plural else ''} of {_type_name(args[-1], True)}"
    return f"{hint.__name__} values" if plural else hint.__name__


# ----------------------------------------------------------------------------------------------- stages


def toml_list(values) -> str:
    return "[" + ",".join(json.dumps(v) for v in values) + "]"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shown(argv: list[str]) -> str:
    """The command as a user types it: `lm2 ...` (paths relative to the current directory when below it)."""
    cwd = Path.cwd()

    def rel(a: str) -> str:
        p = Path(a)
        if p.is_absolute():
            try:
                return str(p.relative_to(cwd))
            except ValueError:
                return a
        return a
    return "lm2 " + " ".join(shlex.quote(rel(a)) for a in argv)


@dataclass
class StageRecord:
    name: str
    command: str
    wall_s: float
    ran: bool  # false: finished by an earlier invocation, skipped now


class Stages:
    """Runs `lm2` stages once: WORK/stages/<name>.json records a finished stage's command and wall time."""

    def __init__(self, work: Path, log=print, jobs: int = 1):
        self.dir = work / "stages"
        self.records: list[StageRecord] = []
        self.log = log
        # jobs > 1: stages run side by side (run_tasks); each one's output goes to WORK/logs/<stage>.log instead of
        # the console, and each gets its share of the CPU threads unless OMP_NUM_THREADS is set already.
        self.jobs = jobs
        self.log_dir = work / "logs"
        self.env = dict(os.environ)
        if jobs > 1 and "OMP_NUM_THREADS" not in self.env:
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()

    def _record_path(self, name: str) -> Path:
        return self.dir / (name.replace("/", "__") + ".json")

    def done(self, name: str, argv: list[str], inputs: dict[str, str], derived: bool) -> dict | None:
        """The record of a finished stage with this command and inputs, else None. A training stage finished
        with another command or recipe is an error (its run directory would mix the two); a derived stage
        (evaluation, inspection) is simply run again."""
        path = self._record_path(name)
        if not path.is_file():
            return None
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec["argv"] == argv and rec["inputs"] == inputs:
            return rec
        if derived:
            return None
        changed = "its inputs changed" if rec["argv"] == argv else "its command changed"
        raise PipelineError(
            f"stage {name} was finished in {self.dir.parent} with another setup ({changed}: was "
            f"`{shown(rec['argv'])}`, inputs {rec['inputs']}); use another --work, or remove {self.dir.parent} "
            f"to start over")

    def run(self, name: str, argv: list[str], inputs: dict[str, str] | None = None,
            resume_dir: Path | None = None, derived: bool = False, before=None) -> StageRecord:
        """Run `lm2 argv` unless recorded as finished. `resume_dir`: a training output directory, continued
        with --resume when it already holds checkpoints. `before`: called first on a fresh (re)run."""
        inputs = inputs or {}
        rec = self.done(name, argv, inputs, derived)
        if rec is not None:
            self.say(f"[{name}] done earlier ({rec['wall_s']:.1f} s): {shown(argv)}")
            record = StageRecord(name, shown(argv), rec["wall_s"], ran=False)
        else:
            run_argv = list(argv)
            if resume_dir is not None and any((resume_dir / "checkpoints").glob("step_*")):
                run_argv.append("--resume")
            if before is not None:
                before()
            log_file = self.log_dir / (name.replace("/", "__") + ".log") if self.jobs > 1 else None
            self.say(f"[{name}] $ {shown(run_argv)}" + (f"   (output: {log_file})" if log_file else ""))
            start = time.perf_counter()
            returncode = self._run_lm2(run_argv, log_file)
            wall = time.perf_counter() - start
            if returncode != 0:
                see = f" (its output: {log_file})" if log_file else ""
                raise PipelineError(f"stage {name} failed (exit code {returncode}) after {wall:.1f} s{see}: "
                                    f"{shown(run_argv)}; fix the cause and run reproduce.py again (finished "
                                    f"stages are kept)")
            if log_file:
                self.say(f"[{name}] finished in {wall:.1f} s")
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self._record_path(name).with_suffix(".tmp")
            tmp.write_text(json.dumps({"argv": argv, "inputs": inputs, "wall_s": wall,
                                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
            os.replace(tmp, self._record_path(name))
            record = StageRecord(name, shown(run_argv), wall, ran=True)
        with self._lock:
            self.records.append(record)
        return record

    def say(self, line: str) -> None:
        """One console line; side-by-side stages never interleave theirs (print writes the text and the newline
        separately)."""
        with self._lock:
            self.log(line, flush=True)

    def _run_lm2(self, argv: list[str], log_file: Path | None) -> int:
        if log_file is None:
            return self._wait(subprocess.Popen([sys.executable, "-m", "lm2cli", *argv], env=self.env))
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a", encoding="utf-8") as out:  # a resumed stage adds to its earlier output
            out.write(f"$ {shown(argv)}\n")
            out.flush()
            return self._wait(subprocess.Popen([sys.executable, "-m", "lm2cli", *argv], env=self.env, stdout=out,
                                               stderr=subprocess.STDOUT))

    def _wait(self, proc: subprocess.Popen) -> int:
        with self._lock:
            self._running.add(proc)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # one job, in the main thread: the stage saves and stops, then the run does
            self.interrupt()
            proc.wait()
            raise
        finally:
            with self._lock:
                self._running.discard(proc)

    def interrupt(self) -> None:
        """SIGINT to every running stage: a training stage saves a checkpoint and stops (the next invocation
        continues it with --resume). Needed when the runner alone is signalled (kill -INT, a scheduler), not a
        terminal's whole process group."""
        with self._lock:
            running = list(self._running)
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)

    def in_order(self, names: list[str]) -> list[StageRecord]:
        """The records in the plan's order (side-by-side stages finish in any order)."""
        rank = {n: i for i, n in enumerate(names)}
        return sorted(self.records, key=lambda r: rank.get(r.name, len(rank)))


def run_weights(run_dir: Path) -> str:
    """Which weights a run directory stands for: the sha256 (from the checkpoint manifests) of the checkpoints
    its `latest` and `best` pointers name. A stage reading the run is redone when these change."""
    out = []
    for pointer in ("latest", "best"):
        state = pointed_state(run_dir, pointer)
        if state is not None:
            out.append(f"{pointer}:{state['manifest']['model.safetensors']['sha256']}")
    return ",".join(out)


def pointed_state(run_dir: Path, pointer: str) -> dict | None:
    """trainer_state.json of the checkpoint a run's pointer names (lm2's own pointer check), None without one."""
    from lm2cli.checkpoint import read_pointer

    root = run_dir / "checkpoints"
    name = read_pointer(root, pointer)
    return None if name is None else json.loads((root / name / "trainer_state.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------- the pipeline


@dataclass
class Layout:
    """Where everything goes under WORK: the tokenizer and sets once; runs, evaluations and inspections per seed,
    and per task group under it when the plan has several (WORK/seed1/qa1+qa2/...)."""

    work: Path
    group: str = ""  # the task group's name; "" = the plan's one group (no directory of its own)
    tasks: list[str] = field(default_factory=list)  # the group's tasks
    base_sets: list[str] = field(default_factory=list)  # plan.group_base_set of the group
    base_min_em: float | None = None  # plan.group_base_min_em of the group; None: plan.base_min_em

    data = property(lambda self: self.work / "data")
    sets = property(lambda self: {s: self.work / "babilong" / s
                                  for s in ("train", "val", "test", "base-train", "base-val", "replay")})

    def seed_dir(self, seed: int) -> Path:
        return self.work / f"seed{seed}" / self.group if self.group else self.work / f"seed{seed}"

    def tag(self, seed: int) -> str:
        """How this seed's (and group's) stages are named: seed1, or seed1/qa1+qa2."""
        return f"seed{seed}/{self.group}" if self.group else f"seed{seed}"

    def pretrain(self, seed: int, model: str) -> Path:
        return self.seed_dir(seed) / "pretrain" / model

    def base(self, seed: int, model: str) -> Path:
        return self.seed_dir(seed) / "finetune-base" / model

    def finetune(self, seed: int, model: str) -> Path:  # the directory name is the model's name in lm2 eval
        return self.seed_dir(seed) / "finetune" / model

    def finetune_part(self, seed: int, model: str, part: int) -> Path:  # a long fine-tune continued later
        return self.seed_dir(seed) / f"finetune-part{part}" / model

    def eval(self, seed: int) -> Path:
        return self.seed_dir(seed) / "eval"

    def inspect(self, seed: int) -> Path:
        return self.seed_dir(seed) / "inspect"


def recipe_paths(recipes: Path, plan: Plan) -> dict[str, Path]:
    paths = {m: recipes / f"{m}.toml" for m in plan.models}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise PipelineError(f"recipe file(s) missing: {', '.join(missing)}; --recipes DIR must hold "
                            f"{', '.join(m + '.toml' for m in plan.models)} (pipeline.toml's plan.models)")
    problems = []
    if plan.inspect_model not in paths:
        problems.append(f"plan.inspect_model = {plan.inspect_model!r} is not one of plan.models {plan.models}")
    if plan.inspect_task not in plan.tasks:
        problems.append(f"plan.inspect_task = {plan.inspect_task!r} is not one of plan.tasks {plan.tasks}")
    if plan.inspect_length not in plan.test_lengths:
        problems.append(f"plan.inspect_length = {plan.inspect_length!r} is not one of plan.test_lengths "
                        f"{plan.test_lengths} (the row is read from the test set)")
    if not plan.seeds:
        problems.append("plan.seeds is empty; give at least one training seed")
    problems += base_from_problems(plan)
    problems += base_set_of_problems(plan)
    problems += task_group_problems(plan)
    if problems:
        raise PipelineError(problems[0], problems)
    return paths


def base_from_problems(plan: Plan) -> list[str]:
    """plan.base_from names, per model, a model of the plan that trains a base fine-tune of its own, earlier."""
    problems = []
    for model, source in plan.base_from.items():
        where = f"plan.base_from.{model} = {source!r}"
        if model not in plan.models:
            problems.append(f"plan.base_from: {model!r} is not one of plan.models {plan.models}")
        elif source not in plan.models or source == model or source in plan.base_from:
            problems.append(f"{where}: name another model of plan.models {plan.models} that trains its own base")
        elif plan.models.index(source) > plan.models.index(model):
            problems.append(f"{where}: {source!r} must come before {model!r} in plan.models (its base is trained "
                            f"first)")
        elif not plan.base_set:
            problems.append(f"{where}: the plan has no base fine-tune (plan.base_set is empty)")
    return problems


def task_groups(plan: Plan) -> list[list[str]]:
    return plan.task_groups or [plan.tasks]


def group_name(group: list[str]) -> str:
    return "+".join(group)


def task_group_problems(plan: Plan) -> list[str]:
    """plan.task_groups split plan.tasks: every task in exactly one group; plan.group_base_set names groups."""
    problems, seen = [], {}
    for group in plan.task_groups:
        if not group:
            problems.append("plan.task_groups: a group is empty; give each group at least one task")
        for task in group:
            if task not in plan.tasks:
                problems.append(f"plan.task_groups: {task!r} is not one of plan.tasks {plan.tasks}")
            elif task in seen:
                problems.append(f"plan.task_groups: {task!r} is in two groups ({seen[task]} and "
                                f"{group_name(group)}); a task trains in one group")
            seen.setdefault(task, group_name(group))
    if plan.task_groups:
        missing = [t for t in plan.tasks if t not in seen]
        if missing:
            problems.append(f"plan.task_groups: {', '.join(missing)} in no group; every task of plan.tasks "
                            f"{plan.tasks} belongs to one")
    names = [group_name(g) for g in task_groups(plan)]
    for table in ("group_base_set", "group_base_min_em"):
        for key in getattr(plan, table):
            if key not in names:
                problems.append(f"plan.{table}: {key!r} is not a task group; the groups are {', '.join(names)} "
                                f"(each group's tasks joined by '+')")
    return problems


def group_layouts(plan: Plan, work: Path) -> list[Layout]:
    """One Layout per task group; a plan with one group keeps the plain layout (WORK/seed1/...)."""
    groups = task_groups(plan)
    return [Layout(work, group_name(g) if len(groups) > 1 else "", list(g),
                   plan.group_base_set.get(group_name(g), []), plan.group_base_min_em.get(group_name(g)))
            for g in groups]


def base_set_of_problems(plan: Plan) -> list[str]:
    """plan.base_set_of names models of the plan that train a base fine-tune of their own."""
    problems = []
    for model in plan.base_set_of:
        where = f"plan.base_set_of.{model}"
        if model not in plan.models:
            problems.append(f"{where}: {model!r} is not one of plan.models {plan.models}")
        elif model in plan.base_from:
            problems.append(f"{where}: {model!r} trains no base of its own (plan.base_from.{model} = "
                            f"{plan.base_from[model]!r}); drop one of the two")
        elif not plan.base_set:
            problems.append(f"{where}: the plan has no base fine-tune (plan.base_set is empty)")
    return problems


@dataclass
class Task:
    """One stage of the pipeline: `run` starts it once every task named in `needs` has finished."""

    name: str
    needs: list[str]
    run: Callable[[], object]


def run_tasks(tasks: list[Task], jobs: int = 1, interrupt: Callable[[], None] | None = None) -> None:
    """Run `tasks`, up to `jobs` at once, each as soon as the tasks it needs have finished and otherwise in list
    order (jobs = 1: one after another, in list order). After a failure no task starts; the running ones finish
    (an interrupted training stage would be continued by the next invocation anyway); the first failure is raised.
    On KeyboardInterrupt `interrupt()` is called (it stops the running stages), they are waited for, and the
    KeyboardInterrupt goes on."""
    names = {t.name for t in tasks}
    unknown = sorted({n for t in tasks for n in t.needs} - names)
    if unknown:
        raise RuntimeError(f"tasks need unknown tasks {unknown}")  # a bug in the plan's task list, not bad input
    done: set[str] = set()
    pending, running, failures = list(tasks), {}, []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            while True:
                if not failures:
                    ready = [t for t in pending if all(n in done for n in t.needs)]
                    for task in ready[:jobs - len(running)]:
                        pending.remove(task)
                        running[pool.submit(task.run)] = task
                if not running:
                    break
                # a timeout, so that the main thread wakes up for a pending Ctrl-C even if the signal went to a
                # worker thread
                finished, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = running.pop(future)
                    if future.exception() is None:
                        done.add(task.name)
                    else:
                        failures.append(future.exception())
        except KeyboardInterrupt:
            if interrupt is not None:
                interrupt()
            wait(running)
            raise
    if failures:
        raise failures[0]
    if pending:
        raise RuntimeError(f"tasks never became ready: {[t.name for t in pending]}")  # a cycle: a bug


def set_tasks(stages: Stages, plan: Plan, first_recipe: Path, lay: Layout, inputs: dict) -> list[Task]:
    """BABILong sets with `lm2 babilong`: training and validation on the training side, test on the test side;
    the base fine-tune's own sets and the replayed rows (training side) when the plan asks for them. Each needs
    the tokenizer only."""
    val_seed = plan.sets_seed + plan.val_seed_offset
    specs = {
        "train": ("train", plan.train_lengths, plan.train_samples, plan.train_haystack, plan.sets_seed),
        "val": ("train", plan.train_lengths, plan.val_samples, plan.train_haystack, val_seed),
        "test": ("test", plan.test_lengths, plan.test_samples, plan.test_haystack, plan.sets_seed),
    }
    if plan.base_set and plan.base_samples:
        specs["base-train"] = ("train", plan.base_lengths, plan.base_samples, plan.train_haystack, plan.sets_seed)
        specs["base-val"] = ("train", plan.base_lengths, plan.base_val_samples, plan.train_haystack, val_seed)
    if plan.replay_samples:
        specs["replay"] = ("train", plan.replay_lengths, plan.replay_samples, plan.train_haystack, plan.replay_seed)
    tasks = []
    for name, (split, lengths, samples, haystack, seed) in specs.items():
        argv = ["babilong", str(first_recipe), "--set", f"data.dir={json.dumps(str(lay.data))}",
                "--set", f"babilong.split={json.dumps(split)}", "--set", f"babilong.tasks={toml_list(plan.tasks)}",
                "--set", f"babilong.lengths={toml_list(lengths)}", "--set", f"babilong.samples={samples}",
                "--set", f"babilong.margin={plan.margin}", "--set", f"babilong.haystack={json.dumps(haystack)}",
                "--set", f"babilong.seed={seed}", "--out", str(lay.sets[name])]
        tasks.append(Task(f"babilong-{name}", ["tokenize"],
                          lambda name=name, argv=argv: stages.run(f"babilong-{name}", argv, inputs)))
    return tasks


class ModelChain:
    """The stages of one model and seed — pretraining (plan.pretrain), the base fine-tune (plan.base_set), then the
    long fine-tune (and its continuations, plan.continue_sets) — each starting from the weights of the one before;
    with plan.base_from the long fine-tune starts from another model's base instead. The base fine-tune is a
    separate `lm2 finetune` because the fact-count curriculum it runs (learn qa1's reasoning on 0k rows first,
    docs/results.md) cannot share a run with the segment stages of the long fine-tune.

    `init_from` and `inputs` are what the next stage starts from and the stage record's inputs (the weights it
    reads); each stage sets them for the next once it has finished."""

    def __init__(self, stages: Stages, plan: Plan, model: str, recipe: Path, seed: int, lay: Layout):
        self.stages, self.plan, self.model, self.recipe, self.seed, self.lay = stages, plan, model, recipe, seed, lay
        self.init_from = ""
        self.inputs = {"recipe_sha256": sha256_file(recipe)}
        self.common = ["--set", f"data.dir={json.dumps(str(lay.data))}", "--set", f"train.seed={seed}"]
        tasks = ["--set", f"finetune.tasks={toml_list(lay.tasks or plan.tasks)}"]
        self.data = ["--set", f"finetune.data={json.dumps(str(lay.sets['train']))}",
                     "--set", f"finetune.val_data={json.dumps(str(lay.sets['val']))}", *tasks]
        self.base_data = self.data if not plan.base_samples else [
            "--set", f"finetune.data={json.dumps(str(lay.sets['base-train']))}",
            "--set", f"finetune.val_data={json.dumps(str(lay.sets['base-val']))}", *tasks]
        if plan.replay_samples:
            self.data = self.data + ["--set", f"finetune.replay_data={json.dumps(str(lay.sets['replay']))}"]

    def tasks(self, sets: list[str]) -> list[Task]:
        """The chain's tasks; `sets`: the names of the tasks that build the data."""
        plan, tag, model = self.plan, self.lay.tag(self.seed), self.model
        out: list[Task] = []
        needs = sets
        if model in plan.base_from:  # starts from the base of another model of the plan, trained by its chain
            needs = [f"{tag}/finetune-base/{plan.base_from[model]}"]
        else:
            if plan.pretrain:
                out.append(Task(f"{tag}/pretrain/{model}", needs, self.pretrain))
                needs = [out[-1].name]
            if plan.base_set:
                out.append(Task(f"{tag}/finetune-base/{model}", needs, self.base))
                needs = [out[-1].name]
        parts = [plan.finetune_set, *(plan.finetune_set + extra for extra in plan.continue_sets)]
        for part, sets_ in enumerate(parts, 1):
            last = part == len(parts)
            name = f"{tag}/finetune/{model}" if last else f"{tag}/finetune-part{part}/{model}"
            out.append(Task(name, needs, lambda name=name, part=part, sets_=sets_, last=last:
                            self.long(name, part, sets_, last)))
            needs = [name]
        return out

    def _advance(self, out: Path, key: str) -> None:
        self.init_from = str(out)
        self.inputs = self.inputs | {key: run_weights(out)}

    def pretrain(self) -> None:
        out = self.lay.pretrain(self.seed, self.model)
        argv = ["pretrain", str(self.recipe), *self.common, *_sets(self.plan.pretrain_set), "--out", str(out)]
        self.stages.run(f"{self.lay.tag(self.seed)}/pretrain/{self.model}", argv, self.inputs, resume_dir=out)
        self._advance(out, "init_weights")

    def base(self) -> None:
        plan, out = self.plan, self.lay.base(self.seed, self.model)
        argv = ["finetune", str(self.recipe), *self.common, "--set", f"finetune.init_from={json.dumps(self.init_from)}",
                *self.base_data, *_sets(plan.base_set + plan.base_set_of.get(self.model, []) + self.lay.base_sets),
                "--out", str(out)]
        self.stages.run(f"{self.lay.tag(self.seed)}/finetune-base/{self.model}", argv, self.inputs, resume_dir=out)
        min_em, key = plan.base_min_em, "plan.base_min_em"
        if self.lay.base_min_em is not None:
            min_em, key = self.lay.base_min_em, f"plan.group_base_min_em.{self.lay.group or group_name(self.lay.tasks)}"
        check_base(out, min_em, f"{self.lay.tag(self.seed)}: the base fine-tune of {self.model}", key)
        self._advance(out, "base_weights")

    def long(self, name: str, part: int, sets: list[str], last: bool) -> None:
        if part == 1 and self.model in self.plan.base_from:
            self._advance(self.lay.base(self.seed, self.plan.base_from[self.model]), "base_weights")
        out = self.lay.finetune(self.seed, self.model) if last else self.lay.finetune_part(self.seed, self.model, part)
        argv = ["finetune", str(self.recipe), *self.common, "--set", f"finetune.init_from={json.dumps(self.init_from)}",
                *self.data, *_sets(sets), "--out", str(out)]
        self.stages.run(name, argv, self.inputs, resume_dir=out)
        self._advance(out, f"part{part}_weights")


def check_base(run_dir: Path, min_em: float, what: str, key: str = "plan.base_min_em") -> None:
    """PipelineError when the checkpoint a long fine-tune would start from (the run's best, else its newest) has a
    validation exact match below min_em (0: no check); `key` is the plan key that set min_em."""
    if not min_em:
        return
    pointer, state = "best", pointed_state(run_dir, "best")
    if state is None:
        pointer, state = "latest", pointed_state(run_dir, "latest") or {}
    em = (state.get("val") or {}).get("val_em")
    if em is None or em < min_em:
        got = "no validation exact match" if em is None else f"{em:.1%} validation exact match"
        raise PipelineError(f"{what} has {got} at step {state.get('step', '?')} ({pointer} of {run_dir}), below "
                            f"{key} = {min_em}: a long "
                            f"fine-tune from it would start from a backbone that has not learned the base task; "
                            f"train it with another seed (--seed) or more steps (plan.base_set), or lower "
                            f"{key}")


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def evaluate(stages: Stages, plan: Plan, seed: int, lay: Layout) -> Path:
    out = lay.eval(seed)
    argv = ["eval", *[str(lay.finetune(seed, m)) for m in plan.models],
            "--set", f"eval.data={json.dumps(str(lay.sets['test']))}",
            "--set", f"eval.tasks={toml_list(lay.tasks or plan.tasks)}",
            "--set", f"eval.lengths={toml_list(plan.test_lengths)}", "--set", f"eval.samples={plan.test_samples}",
            *_sets(plan.eval_set), "--out", str(out)]

    def move_aside():  # lm2 eval never overwrites results: an interrupted or outdated one is kept, renamed
        if out.exists():
            aside = out.with_name(f"{out.name}.earlier-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(aside)
            print(f"[{lay.tag(seed)}/eval] the earlier (unfinished or outdated) evaluation was moved to {aside}")
    inputs = {m: run_weights(lay.finetune(seed, m)) for m in plan.models}
    stages.run(f"{lay.tag(seed)}/eval", argv, inputs, derived=True, before=move_aside)
    return out


def inspect(stages: Stages, plan: Plan, seed: int, lay: Layout) -> Path:
    out = lay.inspect(seed)
    argv = ["inspect-memory", str(lay.finetune(seed, plan.inspect_model)),
            "--babilong", f"{lay.sets['test']}:{plan.inspect_task}:{plan.inspect_length}:0", *plan.inspect_args,
            "--out", str(out)]
    inputs = {"weights": run_weights(lay.finetune(seed, plan.inspect_model))}
    stages.run(f"{lay.tag(seed)}/inspect-memory", argv, inputs, derived=True,
               before=lambda: shutil.rmtree(out) if out.exists() else None)  # derived from the weights: redone
    return out


def pipeline_tasks(stages: Stages, plan: Plan, paths: dict[str, Path], layouts: list[Layout]) -> list[Task]:
    """Every stage of the run in the order one job runs them: tokenizer, sets, then per seed and task group each
    model's chain and the group's evaluation, and last the inspection of the first seed's LM2."""
    lay = layouts[0]
    first = paths[plan.models[0]]
    tok_inputs = {"recipe_sha256": sha256_file(first)}
    tasks = [Task("tokenize", [], lambda: stages.run("tokenize", ["tokenize", str(first), "--out", str(lay.data)],
                                                     tok_inputs))]
    tasks += set_tasks(stages, plan, first, lay, tok_inputs)
    sets = [t.name for t in tasks[1:]]
    for seed in plan.seeds:
        for group in layouts:
            finals = []
            for model, recipe in paths.items():
                tasks += ModelChain(stages, plan, model, recipe, seed, group).tasks(sets)
                finals.append(tasks[-1].name)
            tasks.append(Task(f"{group.tag(seed)}/eval", finals,
                              lambda seed=seed, group=group: evaluate(stages, plan, seed, group)))
    seed, group = plan.seeds[0], inspect_layout(plan, layouts)
    if group is not None:
        tasks.append(Task(f"{group.tag(seed)}/inspect-memory", [f"{group.tag(seed)}/finetune/{plan.inspect_model}"],
                          lambda: inspect(stages, plan, seed, group)))
    return tasks


def inspect_layout(plan: Plan, layouts: list[Layout]) -> Layout | None:
    """The task group whose models answer plan.inspect_task; None when --group left it out."""
    return next((lay for lay in layouts if plan.inspect_task in (lay.tasks or plan.tasks)), None)


def selected_layouts(plan: Plan, layouts: list[Layout], groups: list[str] | None) -> list[Layout]:
    """The task groups named with --group (every group when none). Their directories stay the whole plan's, and
    the sets are the whole plan's, so a later run of the whole plan reuses every stage a group's run finished."""
    if not groups:
        return layouts
    names = [group_name(lay.tasks or plan.tasks) for lay in layouts]
    unknown = [g for g in groups if g not in names]
    if unknown:
        raise PipelineError(f"--group {unknown[0]}: not a task group of the plan; the groups are {', '.join(names)} "
                            f"(each group's tasks joined by '+', as plan.task_groups lists them)")
    return [lay for lay, name in zip(layouts, names, strict=True) if name in groups]


def run_pipeline(plan: Plan, recipes: Path, work: Path, log=print, jobs: int = 1,
                 groups: list[str] | None = None) -> tuple[Stages, dict[int, list[Path]], Path | None]:
    """Run every stage (of the task groups named in `groups`; None: all); returns the stages, each seed's
    evaluation directories (one per task group) and the inspection's (None when its group was not run)."""
    paths = recipe_paths(recipes, plan)
    problems = fairness_problems(load_recipes(paths))
    if problems:
        raise PipelineError("unfair", [f"{recipes}: not a fair comparison: {p}" for p in problems])
    layouts = selected_layouts(plan, group_layouts(plan, work), groups)
    stages = Stages(work, log, jobs)
    tasks = pipeline_tasks(stages, plan, paths, layouts)
    run_tasks(tasks, jobs, interrupt=stages.interrupt)
    stages.records = stages.in_order([t.name for t in tasks])
    inspected = inspect_layout(plan, layouts)
    return (stages, {seed: [lay.eval(seed) for lay in layouts] for seed in plan.seeds},
            inspected.inspect(plan.seeds[0]) if inspected else None)


# ----------------------------------------------------------------------------------------------- fairness

MODEL_SECTIONS = ("model", "memory", "attention", "output")  # what may differ between the compared recipes
PARAM_TOLERANCE = 0.10


def parameter_counts(recipes: dict[str, object]) -> dict[str, int]:
    """Trainable parameters of each recipe's model, built on the meta device (shapes only, no memory)."""
    import torch

    from lm2cli.model import build_model

    counts = {}
    for name, recipe in recipes.items():
        with torch.device("meta"):
            counts[name] = build_model(recipe, recipe.tokenizer.vocab_size).param_report()["total"]
    return counts


def fairness_problems(recipes: dict[str, object]) -> list[str]:
    """Why the recipes would not be a fair comparison (empty: fair). Equal size: parameter counts within 10 %
    of the largest. Same tokenizer and the same training rows in the same order: every section but [model],
    [memory], [attention] and [output] identical (data, tokenizer, babilong, train with its seed, finetune,
    eval), and the same curriculum budgets finetune.stages x memory.segment_len (a stage's rows are those that
    fit its budget). finetune.stages itself may differ with the segment length: an LM2 with 8-token segments
    trains on the same 1k rows with stages = [128] as a 64-token model with [16]."""
    from lm2cli.recipe import sections
    from lm2cli.training.finetune import stage_budgets  # the rows each stage trains on, as lm2 finetune picks them

    problems = []
    counts = parameter_counts(recipes)
    largest = max(counts.values())
    for name, n in counts.items():
        if n < (1 - PARAM_TOLERANCE) * largest:
            problems.append(f"{name}: {n:,} parameters, more than {PARAM_TOLERANCE:.0%} below the largest "
                            f"({largest:,}: {', '.join(f'{k} {v:,}' for k, v in counts.items())})")
    names = list(recipes)
    ref = recipes[names[0]]
    for name in names[1:]:
        r = recipes[name]
        for section in sections():
            if section in MODEL_SECTIONS:
                continue
            a, b = getattr(ref, section), getattr(r, section)
            for key, value in vars(a).items():
                if getattr(b, key) != value and (section, key) != ("finetune", "stages"):  # budgets, below
                    problems.append(f"{name}: {section}.{key} = {getattr(b, key)!r}, {names[0]} has {value!r} "
                                    f"(only [model], [memory], [attention], [output] and, at equal budgets, "
                                    f"finetune.stages may differ)")
        budgets, ref_budgets = stage_budgets(r), stage_budgets(ref)
        if budgets != ref_budgets:
            problems.append(f"{name}: curriculum budgets (finetune.stages x memory.segment_len) {budgets} tokens, "
                            f"{names[0]} has {ref_budgets}: the stages would train on different rows")
    return problems


def load_recipes(paths: dict[str, Path]) -> dict[str, object]:
    from lm2cli.errors import Lm2Error
    from lm2cli.recipe import load_recipe

    try:
        return {name: load_recipe(path) for name, path in paths.items()}
    except Lm2Error as e:
        raise PipelineError(str(e), e.problems) from None


# ----------------------------------------------------------------------------------------------- the report


def read_results(eval_dir: Path) -> dict:
    results = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))
    if not results.get("complete"):
        raise PipelineError(f"{eval_dir}/results.json is not a finished evaluation; run reproduce.py again")
    return results


def merged_results(eval_dirs: list[Path]) -> dict:
    """One seed's results: its evaluation's results.json, or with task groups the groups' merged — their cells side
    by side, the qa1-qa5 average over them computed as lm2 eval computes it (lm2cli's own function), each group's
    models named with their group."""
    parts = [read_results(d) for d in eval_dirs]
    if len(parts) == 1:
        return parts[0]
    from lm2cli.evaluation.babilong import averages

    first = parts[0]["babilong"]
    for d, p in zip(eval_dirs, parts, strict=True):
        if p["babilong"]["variants"] != first["variants"] or p["babilong"]["lengths"] != first["lengths"]:
            raise PipelineError(f"{d}/results.json has other models or lengths than {eval_dirs[0]}/results.json; "
                                f"run reproduce.py again")
    named = list(zip([d.parent.name for d in eval_dirs], parts, strict=True))  # (group, its results)
    cells = [c for _, p in named for c in p["babilong"]["cells"]]
    tasks = [t for _, p in named for t in p["babilong"]["tasks"]]
    digests = {group: p["babilong"]["data"].get("rows_sha256", "") for group, p in named}
    babilong = {**first, "cells": cells, "tasks": tasks, "averages": averages(cells, tasks, first["lengths"]),
                "data": {**first["data"], "rows_sha256_groups": digests}}
    models = [{**m, "name": f"{m['name']} [{group}]"} for group, p in named for m in p["models"]]
    return {**parts[0], "babilong": babilong, "models": models}


def headline_task(results: dict) -> str:
    """The paper's Table 1 number: the qa1-qa5 average when lm2 eval reports it, else the one task evaluated."""
    b = results["babilong"]
    if any(a["task"] == QA_AVERAGE for a in b["averages"]):
        return QA_AVERAGE
    return b["tasks"][0]


def cell_table(all_results: dict[int, dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(model, task, length) -> that cell of every seed's results.json, seeds in order."""
    table: dict[tuple[str, str, str], list[dict]] = {}
    for results in all_results.values():
        b = results["babilong"]
        for c in b["cells"] + b["averages"]:
            table.setdefault((c["model"], c["task"], c["length"]), []).append(c)
    return table


def fmt_cell(cells: list[dict]) -> str:
    """One seed: accuracy (95 % interval); several: mean ± sample standard deviation [min–max]."""
    if len(cells) == 1:
        lo, hi = cells[0]["ci95"]
        return f"{cells[0]['accuracy']:.1f} ({lo:.0f}–{hi:.0f})"
    accs = [c["accuracy"] for c in cells]
    mean = sum(accs) / len(accs)
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
    return f"{mean:.1f} ± {sd:.1f} [{min(accs):.0f}–{max(accs):.0f}]"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def model_rows(results: dict) -> list[str]:
    return list(results["babilong"]["variants"])


def headline_section(all_results: dict[int, dict]) -> list[str]:
    first = next(iter(all_results.values()))
    task, lengths = headline_task(first), first["babilong"]["lengths"]
    table = cell_table(all_results)
    rows = [[m] + [fmt_cell(table[(m, task, n)]) if (m, task, n) in table else "—" for n in lengths]
            for m in model_rows(first)]
    what = "average of the qa1–qa5 accuracies" if task == QA_AVERAGE else f"{task} accuracy"
    spread = ("accuracy % (95 % Wilson interval)" if len(all_results) == 1 else
              f"mean ± standard deviation over {len(all_results)} seeds [min–max], accuracy %")
    carry = ("; rows `+no-carry` are the same model with nothing carried across segments (every segment reads "
             "the initial memory)" if any(m.endswith("+no-carry") for m in model_rows(first)) else "")
    return [f"Paper-style table ({what}; {spread}; rows `+bm25-top<k>` are the retrieval baseline: the same "
            f"model on only the k context sentences BM25 ranks highest{carry}):", ""] + \
        md_table(["model"] + lengths, rows)


def per_task_section(all_results: dict[int, dict]) -> list[str]:
    first = next(iter(all_results.values()))
    b, table = first["babilong"], cell_table(all_results)
    tasks = list(b["tasks"]) + [a for a in dict.fromkeys(x["task"] for x in b["averages"])]
    rows = []
    for task in tasks:
        for m in model_rows(first):
            if any((m, task, n) in table for n in b["lengths"]):
                rows.append([task, m] + [fmt_cell(table[(m, task, n)]) if (m, task, n) in table else "—"
                                         for n in b["lengths"]])
    return md_table(["task", "model"] + list(b["lengths"]), rows)


def pooled(cells: list[dict]) -> tuple[float, float, float]:
    """Mean accuracy over seeds and the 95 % interval: one seed's own; several seeds', from the pooled counts."""
    mean = sum(c["accuracy"] for c in cells) / len(cells)
    if len(cells) == 1:
        return mean, *cells[0]["ci95"]
    from lm2cli.evaluation.metrics import wilson_interval  # the interval lm2 eval reports

    return mean, *wilson_interval(sum(c["correct"] for c in cells), sum(c["n"] for c in cells))


def line_style(model_row: str) -> str:
    """Dashed: the retrieval baseline; dotted: the no-carry control; solid: the models as trained."""
    return "--" if "+bm25" in model_row else ":" if model_row.endswith("+no-carry") else "-"


def write_plot(all_results: dict[int, dict], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(all_results.values()))
    task, lengths, table = headline_task(first), first["babilong"]["lengths"], cell_table(all_results)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for m in model_rows(first):
        xs = [i for i, n in enumerate(lengths) if (m, task, n) in table]
        if not xs:
            continue
        points = [pooled(table[(m, task, lengths[i])]) for i in xs]
        ax.errorbar(xs, [p[0] for p in points], yerr=[[p[0] - p[1] for p in points], [p[2] - p[0] for p in points]],
                    marker="o", capsize=3, label=m, linestyle=line_style(m))
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_xlabel("context length (tokens of the lm2 tokenizer)")
    ax.set_ylabel(f"{task} accuracy %")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def settings_section(plan: Plan, plan_file: Path | None, recipes: Path, all_results: dict[int, dict]) -> list[str]:
    first = next(iter(all_results.values()))
    b = first["babilong"]
    lines = [f"* plan: {plan_file or 'built-in defaults'}; recipes: {recipes}; training seeds: "
             f"{', '.join(map(str, plan.seeds))} (the BABILong sets are the same for every seed: babilong.seed "
             f"{plan.sets_seed})",
             f"* tasks {', '.join(plan.tasks)}; fine-tuning sets: {plan.train_samples} training and "
             f"{plan.val_samples} validation samples per task and length at {', '.join(plan.train_lengths)} "
             f"(training-side stories, haystack `{plan.train_haystack}`); test: up to {plan.test_samples} "
             f"samples per task and length at {', '.join(plan.test_lengths)} (test-side stories, held-out "
             f"haystack `{plan.test_haystack}`); margin {plan.margin} tokens",
             f"* evaluation: mode `{b['mode']}` ({b['metric']}), {b['decoding']} decoding; every model saw the "
             f"same rows (rows_sha256 {rows_digest(first['babilong']['data'])})",
             f"* pretraining --set: {' '.join(plan.pretrain_set) or '(none)'}" if plan.pretrain else
             "* no pretraining (fine-tuned from random weights)",
             f"* base fine-tune --set: {' '.join(plan.base_set)}" if plan.base_set else "* no base fine-tune",
             *base_lines(plan),
             f"* fine-tuning --set: {' '.join(plan.finetune_set) or '(none)'}; evaluation --set: "
             f"{' '.join(plan.eval_set) or '(none)'}",
             *[f"* then continued {i} time(s) from the newest run with the same --set plus: {' '.join(extra)}"
               for i, extra in enumerate(plan.continue_sets, 1)], ""]
    lines += md_table(["model", "arch", "checkpoint step", "weights sha256"],
                      [[m["name"], m["arch"], str(m["step"]), m["sha256"][:12]] for m in first["models"]])
    counts = {}
    for c in b["cells"]:
        counts.setdefault(c["length"], set()).add(c["n"])
    lines += ["", "Samples per cell (each task × length, every model): " +
              ", ".join(f"{n}: {'/'.join(map(str, sorted(v)))}" for n, v in counts.items()) + "."]
    return lines


def rows_digest(data: dict) -> str:
    groups = data.get("rows_sha256_groups")
    if groups:
        return "; ".join(f"{name} {digest[:16]}" for name, digest in groups.items())
    return data.get("rows_sha256", "")[:16] or "in results.json"


def base_lines(plan: Plan) -> list[str]:
    """The plan's base sets, shared bases and replayed rows, as settings lines (none when unused)."""
    lines = []
    if plan.base_set and plan.base_samples:
        lines.append(f"* base fine-tune sets: {plan.base_samples} training and {plan.base_val_samples} validation "
                     f"samples per task at {', '.join(plan.base_lengths)} (training side)")
    for model, extra in plan.base_set_of.items():
        lines.append(f"* {model}: its base fine-tune adds --set {' '.join(extra)}")
    if plan.task_groups:
        lines.append(f"* task groups, each trained as its own models and evaluated on its own tasks: "
                     f"{', '.join(group_name(g) for g in plan.task_groups)}")
    for name, extra in plan.group_base_set.items():
        lines.append(f"* {name}: its base fine-tunes add --set {' '.join(extra)}")
    if plan.base_min_em or plan.group_base_min_em:
        floors = [f"{name} {em:.0%}" for name, em in plan.group_base_min_em.items()]
        lines.append(f"* a long fine-tune starts only from a base with at least {plan.base_min_em:.0%} validation "
                     f"exact match" + (f" ({', '.join(floors)})" if floors else ""))
    for model, source in plan.base_from.items():
        lines.append(f"* {model}: no base of its own; its long fine-tune starts from {source}'s base weights (the "
                     f"same backbone; its own modules start fresh)")
    if plan.replay_samples:
        lines.append(f"* replay: {plan.replay_samples} training-side samples per task at "
                     f"{', '.join(plan.replay_lengths)} (babilong.seed {plan.replay_seed}) join the training rows of "
                     f"every long fine-tune (finetune.replay_data)")
    return lines


def wall_time_section(stages: Stages, elapsed_s: float) -> list[str]:
    rows = [[r.name, f"{r.wall_s:.1f}", "this run" if r.ran else "an earlier run", f"`{r.command}`"]
            for r in stages.records]
    total = sum(r.wall_s for r in stages.records)
    ran = sum(r.ran for r in stages.records)
    return md_table(["stage", "wall s", "measured in", "command"], rows) + \
        ["", f"Total {total:.1f} s ({total / 60:.1f} min) of stage wall time. This invocation ran {ran} of the "
             f"{len(stages.records)} stages in {elapsed_s:.1f} s ({elapsed_s / 60:.1f} min) end to end, "
             f"{stages.jobs} at a time (--jobs {stages.jobs}) on {os.cpu_count()} CPU cores."]


def inspect_section(inspect_dir: Path, figures: Path, results_file: Path) -> list[str]:
    summary = json.loads((inspect_dir / "summary.json").read_text(encoding="utf-8"))
    figures.mkdir(parents=True, exist_ok=True)
    lines = [f"`lm2 inspect-memory` on the trained {summary['arch']} model ({summary['checkpoint']}): "
             f"{summary_text(summary)}.", ""]
    lines += inspect_table(summary)
    pngs = sorted(inspect_dir.glob("*.png"))
    for png in pngs:
        shutil.copyfile(png, figures / png.name)
        lines += ["", f"![{png.stem}]({os.path.relpath(figures / png.name, results_file.parent)})"]
    if not pngs:
        lines += ["", "(no figures: matplotlib, the `plot` extra, is not installed)"]
    return lines


def summary_text(summary: dict) -> str:
    return (f"{summary['prompt_tokens']} tokens of a test row, target {summary.get('target', '?')!r}, generated "
            f"{summary.get('generated_text', '')!r}; {summary.get('facts', 'no facts marked')}")


def inspect_table(summary: dict) -> list[str]:
    """Per memory block: gate means over the written segments, fact attention ratios (1 = facts written like
    any other token), the answer position's read on the fact slots against the even share."""
    if any(entry.get("memory") == "associative" for entry in summary["layers"].values()):
        return associative_inspect_table(summary)
    rows = []
    for layer, entry in summary["layers"].items():
        gates = [_mean([s[g] for s in entry["segments"] if g in s]) for g in ("in_gate", "forget_gate", "out_gate")]
        facts, support = entry.get("facts") or {}, entry.get("supporting_facts") or {}
        answer = (f"{facts['answer_read_on_fact_slots']:.3f} ({facts['answer_read_even']:.3f})"
                  if "answer_read_on_fact_slots" in facts else "—")
        rows.append([layer, _num(facts.get("ratio")), _num(support.get("ratio")), answer, *map(_num, gates)])
    return md_table(["block", "fact attention ratio", "supporting facts ratio", "answer read on fact slots (even)",
                     "g_in", "g_f", "g_out"], rows)


def associative_inspect_table(summary: dict) -> list[str]:
    """memory.write = "delta" (docs/inspection.md): per block the write ratio of the (supporting) facts and the
    answer read's share on them against their share of the tokens held, the mean β and output gate."""
    rows = []
    for layer, entry in summary["layers"].items():
        facts, support = entry.get("facts") or {}, entry.get("supporting_facts") or {}
        shares = [f"{x['answer_read_on_facts']:.3f} ({x['answer_read_even']:.3f})" if "answer_read_on_facts" in x
                  else "—" for x in (facts, support)]
        gate = _mean([s["out_gate"] for s in entry["segments"] if "out_gate" in s])
        rows.append([layer, _num(facts.get("write_ratio")), _num(support.get("write_ratio")), *shares,
                     _num(entry.get("beta_mean")), _num(gate)])
    return md_table(["block", "write ratio facts", "write ratio supporting", "answer read on facts (even)",
                     "on supporting facts (even)", "β", "g_out"], rows)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _num(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def render_section(mode: str, plan: Plan, plan_file: Path | None, recipes: Path, stages: Stages,
                   evals: dict[int, list[Path]], inspect_dir: Path | None, results_file: Path, command: str,
                   elapsed_s: float, title: str | None = None) -> str:
    all_results = {seed: merged_results(dirs) for seed, dirs in evals.items()}
    figures = results_file.parent / "figures" / f"{results_file.stem}-{mode}"
    plot = figures / "accuracy_vs_length.png"
    have_plot = write_plot(all_results, plot)
    lines = [f"## Results: {title or ' '.join(mode.rsplit('-', 1))} run", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} from "
             f"{', '.join(str(d / 'results.json') for dirs in evals.values() for d in dirs)}; every number below is "
             f"read from "
             f"those files.", ""]
    lines += headline_section(all_results)
    lines += ["", "### Accuracy against length", ""]
    lines += [f"![accuracy against length]({os.path.relpath(plot, results_file.parent)})" if have_plot else
              "(no plot: matplotlib, the `plot` extra, is not installed)", "",
              "Points are the mean over seeds; bars the 95 % Wilson interval (of the pooled counts over seeds)."]
    lines += ["", "### Per task", ""] + per_task_section(all_results)
    lines += ["", "### Settings and sample counts", ""] + settings_section(plan, plan_file, recipes, all_results)
    lines += ["", "### Wall time of every stage", ""] + wall_time_section(stages, elapsed_s)
    lines += ["", "### Memory of the trained LM2", ""]
    lines += inspect_section(inspect_dir, figures, results_file) if inspect_dir else [
        f"(not inspected: plan.inspect_task {plan.inspect_task} belongs to a task group this run left out "
        f"with --group)"]
    return "\n".join(lines) + "\n"


def write_section(results_file: Path, mode: str, body: str) -> None:
    """Replace this mode's marked section of the results file (appended if absent); the rest is kept."""
    start, end = f"<!-- reproduce:{mode}:start -->", f"<!-- reproduce:{mode}:end -->"
    text = results_file.read_text(encoding="utf-8") if results_file.exists() else ""
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + block + "\n"
    results_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = results_file.with_name(f".{results_file.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, results_file)


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the plan's [quick] overrides: qa1, 0k-4k, 3 seeds")
    p.add_argument("--smoke", action="store_true",
                   help="the plan's tiny version (RECIPES/smoke): the whole pipeline in seconds, no accuracy claim")
    p.add_argument("--seed", type=int, action="append",
                   help="training seed (repeatable); default: the plan's seeds")
    p.add_argument("--recipes", type=Path, help="directory of <model>.toml recipes and pipeline.toml "
                                                "(default recipes/babilong; recipes/babilong/one-backbone: every "
                                                "model from one vanilla backbone per seed)")
    p.add_argument("--work", type=Path, help="where data, runs and evaluations go (default runs/babilong[-quick|"
                                             "-smoke])")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="stages run at once (default 1): training stages of different models and seeds side by side "
                        "as soon as the weights they start from exist; each stage's output goes to WORK/logs/ and "
                        "each gets CPU threads / JOBS (OMP_NUM_THREADS, unless set)")
    p.add_argument("--group", action="append", metavar="TASKS",
                   help="run only this task group of the plan (repeatable), named by its tasks joined by '+' (e.g. "
                        "qa1+qa2); its results get their own section, and a later run of the whole plan in the same "
                        "WORK reuses every stage it finished")
    p.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE", default=[],
                   help="override a key of pipeline.toml's plan after [plan] (and [quick]), as in lm2's --set: the "
                        "value is a TOML literal, e.g. --set 'test_lengths=[\"0k\",\"1k\"]' (repeatable)")
    p.add_argument("--results", type=Path, help="results file; the run rewrites only its own marked section "
                                                "(default docs/results.md; with --smoke WORK/results.md)")
    return p.parse_args(argv)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of stages, 1 or more")
    return value


def run_name(args: argparse.Namespace) -> str:
    """smoke, quick or full; another plan than recipes/babilong prefixes its directory's name (one-backbone-quick),
    so its results section, figures and default work directory are its own."""
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan_dir = (args.recipes or HERE).resolve()
    return mode if plan_dir == HERE else f"{plan_dir.name}-{mode}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = run_name(args)
    recipes = (args.recipes or HERE) / ("smoke" if args.smoke else "")  # a plan's smoke version is DIR/smoke
    work = args.work or Path("runs") / ("babilong" if mode == "full" else f"babilong-{mode}")
    results_file = args.results or (work / "results.md" if args.smoke else REPO / "docs" / "results.md")
    groups = list(dict.fromkeys(args.group or []))
    section = "-".join([mode, *groups])  # a group's run has its own section and figures, the same WORK
    title = " ".join(mode.rsplit("-", 1)) + (f", task group {', '.join(groups)} only" if groups else "")
    try:
        plan, plan_file = load_plan(recipes, args.quick, args.overrides)
        if args.seed:
            plan = replace(plan, seeds=list(dict.fromkeys(args.seed)))
        start = time.perf_counter()
        stages, evals, inspect_dir = run_pipeline(plan, recipes.resolve(), work.resolve(), jobs=args.jobs,
                                                  groups=groups)
        command = "python recipes/babilong/reproduce.py" + "".join(
            f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
        write_section(results_file, section, render_section(section, plan, plan_file, recipes, stages, evals,
                                                            inspect_dir, results_file, command,
                                                            time.perf_counter() - start, title))
    except PipelineError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept, run the same command again to continue",
              file=sys.stderr)
        return 130
    print(f"reproduce: {mode} run done in {time.perf_counter() - start:.1f} s; results in {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
