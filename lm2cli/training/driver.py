"""The stage driver behind `lm2 pretrain` and `lm2 finetune`: a run is a curriculum of stages (pretraining is a
curriculum of one).

Per run: logging set up, a validation left pending by an interrupted run done first, then each stage not yet
finished, every stage after the first starting from the best checkpoint (by validation loss) of the one before,
with a fresh optimizer. Within a stage, loop.train_stage runs the steps.
"""

from __future__ import annotations

from collections.abc import Callable

from lm2cli import checkpoint as layout
from lm2cli.errors import Lm2Error
from lm2cli.training.loop import load_model_weights, train_stage, validate
from lm2cli.training.metrics import fmt_duration
from lm2cli.training.session import RunPlan, begin_logging, end_logging, new_optimizer
from lm2cli.training.types import Session, Stage


def run_stages(s: Session, plan: RunPlan, stages: list[Stage], data_for: Callable[[Stage], object]) -> None:
    """Train `s` through `stages` from where it stands (`s.step`, `s.stage`); `data_for(stage)` gives a stage's
    data (pretraining: always the same)."""
    begin_logging(s, s.recipe.to_toml(), stages[-1].end_step, resumed=plan.resume_from is not None)
    try:
        pending = bool(plan.state and plan.state.get("eval_pending"))
        trained = False
        for stage in stages[s.stage:]:
            data = data_for(stage)
            if pending:  # the run was stopped between a save and its validation: validate that checkpoint first
                validate(s, stage, data, s.ckpt_root / layout.checkpoint_name(s.step))
                pending = False
            if s.step >= stage.end_step:
                continue  # finished before the interruption: go on to the next stage
            if s.step == stage.start_step and stage.index > 0:
                start_next_stage(s, stage)
            train_stage(s, data, stage)
            summarize(s, stage)
            trained = True
        if not trained:
            s.say(nothing_to_train(s, stages))
    finally:
        end_logging(s)


def nothing_to_train(s: Session, stages: list[Stage]) -> str:
    if len(stages) == 1:
        return (f"nothing to train: the checkpoint is at step {s.step} and train.steps = {stages[0].steps}; "
                f"raise train.steps to continue")
    return (f"nothing to train: the checkpoint is at step {s.step}, the end of the last of {len(stages)} "
            f"curriculum stages; add stages to finetune.stages to continue")


def start_next_stage(s: Session, stage: Stage) -> None:
    """Begin curriculum stage `stage` from the best checkpoint of the previous one, with a fresh optimizer."""
    previous = s.best.get(f"best_stage_{stage.index}")
    if previous is None:
        raise Lm2Error(f"{stage.label}the previous stage has no validated checkpoint to start from")
    ckpt = s.ckpt_root / previous["checkpoint"]
    s.rt.barrier()
    load_model_weights(s, ckpt)
    s.optimizer = new_optimizer(s.model, s.recipe, s.rt, announce=False)
    s.stage, s.rows_done, s.carry = stage.index, 0, None
    s.best.pop("best", None)  # `best` tracks the current stage
    s.say(f"{stage.label}starting from {ckpt} (val loss {previous['val_loss']:.4f})")


def summarize(s: Session, stage: Stage) -> None:
    best = s.best.get(stage.best_pointers[0])
    first = s.extra_state.get("start_val_loss")
    last = s.extra_state.get("last_val_loss")
    parts = [f"step {s.step} after {fmt_duration(s.train_seconds)} of training"]
    if first is not None and last is not None:
        parts.append(f"val loss {first:.4f} -> {last:.4f}")
    if best:
        parts.append(f"best {best['val_loss']:.4f} at {s.ckpt_root / best['checkpoint']}")
    s.say(f"{stage.label}done: " + "; ".join(parts))
