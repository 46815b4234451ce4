"""`lm2 eval [RUN_OR_CHECKPOINT_OR_RECIPE ...] [--set eval.key=value ...] [--out DIR] [--json]`.

Settings come from the [eval] section of the first argument's recipe (the recipe file itself, or the recipe
stored in a run's checkpoint), overridden by `--set`. Everything that can be checked is checked before the
first model runs: the arguments, the settings, the data of every kind, the tokenizers (several models are
compared only on exactly the same token sequences) and the lengths each model accepts. Then each model is
loaded in turn and evaluated on the same samples; the results files are rewritten after every finished cell.
Ctrl-C (or SIGTERM) stops after the current batch: what finished is kept, marked incomplete, and the command
exits with code 2.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from lm2cli.errors import Lm2Error
from lm2cli.evaluation import report
from lm2cli.evaluation.decode import StateRunner
from lm2cli.evaluation.models import (
    EvalModel,
    autocast_dtype,
    check_same_tokenizer,
    default_results_dir,
    resolve_device,
    resolve_models,
)


class Stopped(Exception):
    """Raised between batches once SIGINT/SIGTERM was received."""


# ---------------------------------------------------------------------------------------------- settings


def check_sets(sets: list[str]) -> None:
    """Every problem of the --set arguments at once, one line each: a key outside [eval] (the models come from
    their checkpoints), and eval.* keys or values the schema refuses (checked here on the defaults, and again
    on the settings recipe)."""
    from lm2cli.errors import RecipeError
    from lm2cli.recipe import load_recipe, parse_override

    problems, own = [], []
    for text in sets:
        try:
            section, _, _ = parse_override(text)
        except RecipeError as e:
            problems += e.problems
            continue
        if section == "eval":
            own.append(text)
        else:
            problems.append(f"--set {text}: lm2 eval takes only eval.* keys (the models come from their "
                            f"checkpoints), e.g. --set eval.samples=20")
    try:
        load_recipe(None, own)
    except RecipeError as e:
        problems += e.problems
    if problems:
        raise RecipeError(problems)


def settings_recipe(first: EvalModel, sets: list[str]):
    """The recipe whose [eval] section (with --set applied) drives the run."""
    from lm2cli.recipe import apply_overrides, load_recipe

    if first.target.recipe_file is not None:
        return load_recipe(first.target.recipe_file, sets)
    return apply_overrides(first.recipe, sets)


def kinds_to_run(cfg) -> list[str]:
    kinds = list(dict.fromkeys(cfg.run))
    if cfg.mc_data and "multiple-choice" not in kinds:
        kinds.append("multiple-choice")
    if cfg.harness_tasks and "harness" not in kinds:
        kinds.append("harness")
    if "multiple-choice" in kinds and not cfg.mc_data:
        raise Lm2Error("eval.run includes multiple-choice but eval.mc_data is empty; set it to a file, a directory "
                       "or a hub name such as cais/mmlu")
    if "harness" in kinds and not cfg.harness_tasks:
        raise Lm2Error('eval.run includes harness but eval.harness_tasks is empty; e.g. --set '
                       '\'eval.harness_tasks=["lambada_openai"]\'')
    if not kinds:
        raise Lm2Error("nothing to evaluate: eval.run is empty (choose among babilong, perplexity, "
                       "multiple-choice, harness)")
    return kinds


# -------------------------------------------------------------------------------------------- planning


def make_plans(kinds: list[str], cfg, recipe, models: list[EvalModel], recipe_hint: str) -> dict:
    """Load and check the data of every kind, and the lengths each model must accept, before running any."""
    from lm2cli.data.babilong import length_tokens

    plans: dict = {}
    tokenizer = models[0].tokenizer
    if "babilong" in kinds:
        from lm2cli.evaluation.babilong import plan_babilong

        plans["babilong"] = plan_babilong(cfg, recipe_hint)
        for m in models:
            for length in cfg.lengths:
                m.check_length(length_tokens(length), f"eval.lengths includes {length}")
        data_tok = (plans["babilong"].data.get("tokenizer") or {}).get("sha256")
        if data_tok and data_tok != tokenizer.sha256:
            say(f"warning: {cfg.data} was built with another tokenizer ({data_tok[:12]}) than the model's "
                f"({tokenizer.sha256[:12]}): its lengths are not counted in this model's tokens")
    if "perplexity" in kinds:
        from lm2cli.evaluation.perplexity import plan_perplexity

        plans["perplexity"] = plan_perplexity(cfg, recipe.data.dir, tokenizer)
        for m in models:
            m.check_length(plans["perplexity"].seq_len, "eval.ppl_seq_len")
    if "multiple-choice" in kinds:
        from lm2cli.evaluation.multiple_choice import plan_multiple_choice

        plans["multiple-choice"] = plan_multiple_choice(cfg)
    if "harness" in kinds:
        try:
            from lm2cli.evaluation import harness
        except ImportError:
            raise Lm2Error('eval.harness_tasks needs lm-evaluation-harness: pip install "lm2[harness]" (or pip '
                           'install lm-eval)') from None
        plans["harness"] = harness.task_manager(list(cfg.harness_tasks), cfg.harness_include)
    return plans


def say(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


# ------------------------------------------------------------------------------------------------- run


@contextmanager
def stop_on_signals():
    """The first SIGINT/SIGTERM asks the run to stop after the current batch; a second one interrupts at once."""
    flag = {"signal": None}
    previous = {}

    def handler(signum, frame):
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name
        say(f"{flag['signal']}: stopping after the current batch (again to stop at once); finished cells are kept")

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handlers, Ctrl-C raises KeyboardInterrupt as usual
        previous = {}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def cpu_threads_for(net, device, requested: int):
    """Torch CPU threads chosen as `lm2 generate` chooses them (small models: one thread, which on a busy
    machine is many times faster than several waiting for each other); restored afterwards."""
    import torch

    if device.type != "cpu":
        yield str(device)
        return
    from lm2cli.generation.command import cpu_threads

    previous = torch.get_num_threads()
    n, why = cpu_threads(requested, sum(p.numel() for p in net.parameters()))
    torch.set_num_threads(n)
    try:
        yield f"cpu, {n} thread{'s' if n > 1 else ''} ({'eval.threads' if requested else why})"
    finally:
        torch.set_num_threads(previous)


class EvalRun:
    def __init__(self, out_dir: Path, cfg, kinds: list[str], plans: dict, models: list[EvalModel], command: str):
        self.out_dir, self.cfg, self.kinds, self.plans, self.models = out_dir, cfg, kinds, plans, models
        self.predictions: list[dict] = []
        self.started = time.time()
        self.flag = {"signal": None}
        self.results = {
            "format": report.FORMAT, "format_version": 1, "lm2_version": _version(), "complete": False,
            "status": "running", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": 0.0,
            "command": command, "settings": {**dataclasses.asdict(cfg), "kinds": kinds},
            "models": [m.describe() for m in models],
        }
        if "babilong" in plans:
            plan = plans["babilong"]
            from lm2cli.evaluation.babilong import variant_name

            variants = [variant_name(m.name, v, plan.retrieval_k) for m in models
                        for v in plan.variants(m.has_memory)]
            self.results["babilong"] = {**plan.describe(), "variants": variants, "cells": [], "averages": []}
        if "perplexity" in plans:
            self.results["perplexity"] = {"data": plans["perplexity"].describe(), "results": []}
        if "multiple-choice" in plans:
            self.results["multiple_choice"] = {"data": plans["multiple-choice"].describe(), "results": []}
        if "harness" in plans:
            self.results["harness"] = {"tasks": list(cfg.harness_tasks), "include": cfg.harness_include,
                                       "fewshot": cfg.harness_fewshot, "limit": cfg.harness_limit, "results": []}

    # ------------------------------------------------------------------------------------------ driving

    def execute(self) -> dict:
        device = resolve_device(self.cfg.device)
        with stop_on_signals() as self.flag:
            try:
                for model in self.models:
                    net = model.load(device)
                    with cpu_threads_for(net, device, self.cfg.threads) as where:
                        amp = autocast_dtype(device, self.cfg.dtype)
                        precision = "bf16 autocast" if amp is not None else "fp32"
                        say(f"{model.name}: {model.target.checkpoint} (step {model.info['step']}) on {where}, "
                            f"{precision}")
                        runner = StateRunner(net, model.recipe.memory.segment_len, device, self.cfg.batch_size,
                                             amp)
                        for kind in self.kinds:
                            getattr(self, "run_" + kind.replace("-", "_"))(model, runner)
                        model.unload()
            except (Stopped, KeyboardInterrupt):
                name = self.flag["signal"] or "SIGINT"
                self.finish(f"interrupted by {name}")
                kept = (f"the finished results are in {self.out_dir}, marked incomplete" if self.has_numbers()
                        else "nothing had finished, nothing was written")
                raise Lm2Error(f"interrupted by {name}: {kept}; run the command again for the whole "
                               f"evaluation") from None
            except Lm2Error as e:
                self.finish(f"stopped by an error: {e}")
                raise
            except BaseException as e:
                self.finish(f"stopped by an internal error: {type(e).__name__}")
                raise
        self.finish(None)
        return self.results

    def checkpoint(self) -> None:
        """Write every results file as it stands (atomically; results.json says the run is not complete)."""
        self.results["elapsed_s"] = round(time.time() - self.started, 3)
        report.write_results(self.out_dir, self.results, self.predictions)

    def finish(self, problem: str | None) -> None:
        self.results["complete"] = problem is None
        self.results["status"] = "complete" if problem is None else problem
        if not self.has_numbers():
            return  # nothing finished: write nothing that could look like a result
        if problem is None:  # plots only of a finished run: a PNG cannot say it is incomplete
            try:
                self.results["plots"] = [p.name for p in report.write_plots(self.out_dir, self.results)]
            except ImportError:
                say('plots skipped: they need matplotlib (pip install "lm2[plot]")')
        self.checkpoint()

    def has_numbers(self) -> bool:
        sections = [self.results.get(k) for k in ("babilong", "perplexity", "multiple_choice", "harness")]
        return any(s and (s.get("cells") or s.get("results")) for s in sections)

    def progress(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, leave=False, dynamic_ncols=True,
                    disable=None)

    def tick(self, bar, n: int) -> None:
        bar.update(n)
        if self.flag["signal"] is not None:
            raise Stopped

    def record(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint()

    # ------------------------------------------------------------------------------------------ kinds

    def run_babilong(self, model: EvalModel, runner) -> None:
        from lm2cli.evaluation.babilong import averages, evaluate_cell, variant_name

        plan, section = self.plans["babilong"], self.results["babilong"]
        for variant in plan.variants(model.has_memory):
            name = variant_name(model.name, variant, plan.retrieval_k)
            total = sum(len(plan.rows[(t, n)]) for t in plan.tasks for n in plan.lengths)
            with self.progress(total, f"{name} babilong") as bar:
                for task in plan.tasks:
                    for length in plan.lengths:
                        cell = evaluate_cell(runner, model.tokenizer, plan, task, length, name, variant,
                                             check_length=model.check_length,
                                             on_done=lambda rows, bar=bar: self.tick(bar, len(rows)))
                        summary = cell.summary()
                        section["cells"].append(summary)
                        section["averages"] = averages(section["cells"], plan.tasks, plan.lengths)
                        self.predictions += cell.predictions
                        self.record()
                        say(f"{name} {task} {length}: {report.fmt_accuracy(summary)} % of {cell.n} "
                            f"({summary['samples_per_s']} samples/s)")

    def run_perplexity(self, model: EvalModel, runner) -> None:
        from lm2cli.evaluation.perplexity import evaluate_perplexity

        plan = self.plans["perplexity"]
        with self.progress(len(plan.sequences), f"{model.name} perplexity") as bar:
            result = evaluate_perplexity(runner, model.tokenizer, plan, model.name,
                                         on_done=lambda n: self.tick(bar, n))
        result["training_val_loss"] = model.info["val_loss"]
        self.results["perplexity"]["results"].append(result)
        self.record()
        bpb = "" if result["bpb"] is None else f", {result['bpb']:.4f} bits/byte"
        say(f"{model.name} perplexity: loss {result['loss']:.4f}, ppl {result['ppl']:.3f}{bpb} over "
            f"{result['tokens']:,} tokens")

    def run_multiple_choice(self, model: EvalModel, runner) -> None:
        from lm2cli.evaluation.multiple_choice import evaluate_multiple_choice

        plan = self.plans["multiple-choice"]
        with self.progress(len(plan.questions), f"{model.name} multiple choice") as bar:
            result = evaluate_multiple_choice(runner, model.tokenizer, plan, model.name, model.check_length,
                                              on_done=lambda rows: self.tick(bar, len(rows)))
        self.predictions += result.pop("predictions")
        self.results["multiple_choice"]["results"].append(result)
        self.record()
        say(f"{model.name} multiple choice: {report.fmt_accuracy(result['overall'])} % of {result['overall']['n']}")

    def run_harness(self, model: EvalModel, runner) -> None:
        from lm2cli.evaluation.harness import Lm2LM, run_harness

        lm = Lm2LM(model=model.model, tokenizer=model.tokenizer, recipe=model.recipe, device=str(runner.device),
                   batch_size=self.cfg.batch_size, dtype=self.cfg.dtype)
        rows = run_harness(lm, model.name, self.cfg, self.plans["harness"])
        if self.flag["signal"] is not None:
            raise Stopped
        self.results["harness"]["results"] += rows
        self.record()


def _version() -> str:
    from lm2cli import __version__

    return __version__


# ----------------------------------------------------------------------------------------------- entry


def eval_command(arguments: list[str], sets: list[str] | None = None, out: Path | None = None,
                 json_output: bool = False, verify_checksums: bool = True) -> dict:
    """`arguments`: RUN_OR_CHECKPOINT_OR_RECIPE each (none: the default recipe's run, as `lm2 generate`)."""
    sets = list(sets or [])
    arguments = list(arguments or [])
    check_sets(sets)
    models = resolve_models(arguments, verify_checksums)
    recipe = settings_recipe(models[0], sets)
    cfg = recipe.eval
    kinds = kinds_to_run(cfg)
    check_same_tokenizer(models)
    first = models[0].target
    recipe_hint = str(first.recipe_file) if first.recipe_file else "RECIPE"
    plans = make_plans(kinds, cfg, recipe, models, recipe_hint)
    out_dir = Path(out) if out is not None else default_results_dir(models[0], cfg.name)
    if (out_dir / "results.json").exists():
        raise Lm2Error(f"{out_dir} already holds results (results.json); choose another --out or eval.name, or "
                       f"remove it")
    command = " ".join(["lm2 eval", *arguments, *(f"--set {s}" for s in sets),
                        *([f"--out {out}"] if out is not None else []),
                        *([] if verify_checksums else ["--no-verify-checksums"])])
    results = EvalRun(out_dir, cfg, kinds, plans, models, command).execute()
    if json_output:
        import json

        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print(report.render_markdown(results), end="")
    say(f"results: {out_dir}")
    return results
