"""The one training loop behind `lm2 pretrain` and `lm2 finetune`.

Read it top to bottom: `train_stage` runs optimizer steps; each step sets the learning rate by hand, runs
`grad_accum` micro-batches (gradients summed, normalised by the number of target tokens of the whole step
across all processes, so any split into micro-batches and ranks gives the same update), clips, steps AdamW,
logs, and then, at the step boundaries the recipe asks for, saves and evaluates — always in that order, so a
crash in evaluation never costs training. A signal stops the run after the current step and a save; a
non-finite loss stops it before the optimizer step, leaving every checkpoint as it was. What it works on
(`Batch`, `Stage`, `Session`) is in types.py; the stages of a run are driven by driver.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lm2cli import checkpoint as layout
from lm2cli.errors import Lm2Error
from lm2cli.scoring import IGNORE, Scores, answer_hits, loss_sum, score_batches
from lm2cli.training import checkpoints as ck
from lm2cli.training.cursor import rows_for
from lm2cli.training.metrics import LossEMA
from lm2cli.training.optim import lr_at, set_lr
from lm2cli.training.runtime import TrainingInterrupted
from lm2cli.training.types import Batch, Session, Stage

__all__ = ["IGNORE", "Batch", "Session", "Stage", "loss_sum", "train_stage", "evaluate", "validate", "save"]


# ------------------------------------------------------------------------------------------- losses


def forward_loss(s: Session, batch: Batch, model: torch.nn.Module, state: Any = None) -> tuple[Tensor, Tensor, Any]:
    """(summed loss, the logits of the target positions packed (N, V), the model's final state)."""
    # The final state is only needed when memory is carried to the next batch; without it the model skips the
    # last memory write, which nothing in this batch reads. Logits only where there is a target: a fine-tuning
    # row has a few answer tokens, and the head over every position cost 20-27 % of a 1k-token step (d 128).
    with s.rt.autocast():
        logits, new_state = model(batch.inputs, state, keep_state=s.recipe.memory.carry,
                                  logits_at=batch.targets != IGNORE)
    return loss_sum(logits, batch.targets), logits, new_state


def to_device(batch: Batch, device: torch.device) -> Batch:
    if batch.inputs.device == device:
        return batch
    nb = device.type == "cuda"
    return dataclasses.replace(batch, inputs=batch.inputs.to(device, non_blocking=nb),
                               targets=batch.targets.to(device, non_blocking=nb))


class NonFiniteLoss(Lm2Error):
    pass


# --------------------------------------------------------------------------------------------- the loop


def schedule_due(local_step: int, stage_steps: int, every: int) -> bool:
    """Is a save/eval due after `local_step` steps of a stage? Always at the stage's end; 0 = only there."""
    return local_step == stage_steps or (every > 0 and local_step % every == 0)


def train_stage(s: Session, data, stage: Stage) -> None:
    """Run optimizer steps until the end of `stage`, starting from `s.step` (fresh or resumed)."""
    tcfg = s.recipe.train
    ema = LossEMA()
    tokens_since, t_log = 0, time.perf_counter()
    s.console.first, s.console.total = s.step, stage.end_step
    if s.step == stage.start_step and s.step < stage.end_step:
        validate(s, stage, data, ckpt=None)  # where the stage starts from, for the curve
        t_log = time.perf_counter()
    while s.step < stage.end_step:
        t0 = time.perf_counter()
        local = s.step - stage.start_step
        lr = lr_at(local, lr=tcfg.lr, min_lr=tcfg.min_lr, warmup_steps=tcfg.warmup_steps, total_steps=stage.steps)
        loss, grad_norm, n_tokens, hits = optimizer_step(s, data, lr)
        s.train_seconds += time.perf_counter() - t0
        if hits is not None:
            after_step(s, data, stage, hits)
        tokens_since += n_tokens
        smooth = ema.update(loss)
        local += 1
        if local % tcfg.log_every == 0 or s.step == stage.end_step:
            tok_s = tokens_since / max(1e-9, time.perf_counter() - t_log)
            log_step(s, data, stage, loss, smooth, lr, grad_norm, n_tokens, tok_s)
            tokens_since, t_log = 0, time.perf_counter()
        stop = stop_requested(s)
        eval_now = schedule_due(local, stage.steps, tcfg.eval_every)
        if stop or eval_now or schedule_due(local, stage.steps, tcfg.save_every):
            ckpt = save(s, stage, eval_pending=eval_now)
            if eval_now:
                validate(s, stage, data, ckpt)
            t_log = time.perf_counter()  # saving and evaluating are not training throughput
        if stop:
            raise TrainingInterrupted(
                f"stopped by {s.stop.name} after step {s.step}; saved "
                f"{s.ckpt_root / layout.checkpoint_name(s.step)}. "
                f"Resume with: {s.resume_hint}", s.stop.signum)


def optimizer_step(s: Session, data, lr: float) -> tuple[float, float, int, tuple[int, int] | None]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss, gradient norm, input tokens, and
    for data that watches its own progress (`data.after_step`) the step's (correct, answer) rows over all ranks).
    """
    rt, tcfg = s.rt, s.recipe.train
    set_lr(s.optimizer, lr)
    batches = [to_device(data.batch(rows_for(s.rows_done, m, rt.rank, rt.world, tcfg.batch_size), tcfg.batch_size),
                         rt.device) for m in range(tcfg.grad_accum)]
    counts = torch.tensor([sum(int((b.targets != IGNORE).sum()) for b in batches),
                           sum(b.n_tokens for b in batches)], dtype=torch.float64)
    n_targets, n_tokens = (int(x) for x in rt.all_reduce(counts).tolist())
    total_loss = torch.zeros((), dtype=torch.float64, device=rt.device)
    watch = hasattr(data, "after_step")  # exact match of the step's own rows, from its logits (fact curriculum)
    hits = torch.zeros(2, dtype=torch.long, device=rt.device)
    for m, batch in enumerate(batches):
        # Gradients are reduced across ranks on the last micro-batch only; the others accumulate locally.
        with gradient_sync(s, enabled=m == len(batches) - 1):
            loss, logits, state = forward_loss(s, batch, s.train_model, s.carry)
            if watch:
                hits += answer_hits(logits, batch.targets)
            # Scaled so that the gradient DDP/FSDP average over ranks is the mean over all target tokens.
            (loss * (rt.world / max(1, n_targets))).backward()
        total_loss += loss.detach().double()
        if s.recipe.memory.carry:
            s.carry = s.model.carry_memory(state)
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    step_loss, norm = float(rt.all_reduce(total_loss).item()) / max(1, n_targets), float(grad_norm)
    if not math.isfinite(step_loss) or not math.isfinite(norm):
        raise non_finite(s, s.step + 1, step_loss, norm)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    s.steps_this_run += 1
    s.rows_done += tcfg.batch_size * tcfg.grad_accum * rt.world
    rt.sync()
    step_hits = tuple(int(x) for x in rt.all_reduce(hits.double()).tolist()) if watch else None
    return step_loss, norm, n_tokens, step_hits


def after_step(s: Session, data, stage: Stage, hits: tuple[int, int]) -> None:
    """Tell the data how the step went; a change it reports (a curriculum step-up) goes to the console and
    metrics.jsonl (kind "curriculum")."""
    change = data.after_step(s.rows_done, *hits)
    if change is None:
        return
    s.say(f"{stage.label}step {s.step}: {change.pop('message')}")
    if s.metrics is not None:
        s.metrics.write({"kind": "curriculum", "step": s.step, "stage": stage.index + 1, **change})


def log_step(s: Session, data, stage: Stage, loss: float, smooth: float, lr: float, grad_norm: float,
             n_tokens: int, tok_s: float) -> None:
    peak = s.rt.peak_flops()
    mfu = s.flops_per_token * tok_s / (peak * s.rt.world) if peak else None
    s.console.step(s.step, smooth, lr, tok_s, mfu, stage.label)
    if s.metrics is not None:
        s.metrics.write({"kind": "train", "step": s.step, "stage": stage.index + 1, "loss": loss, "lr": lr,
                         "grad_norm": grad_norm, "tokens": n_tokens, "tokens_per_s": tok_s, "mfu": mfu,
                         "elapsed_s": round(s.train_seconds, 3), "epoch": round(data.epoch_at(s.rows_done), 4)})


@contextmanager
def gradient_sync(s: Session, enabled: bool):
    """DDP's no_sync / FSDP's requires_gradient_sync(False) for accumulation micro-batches."""
    if enabled or not s.rt.distributed:
        yield
    elif s.fsdp:
        from lm2cli.training.fsdp import set_gradient_sync

        set_gradient_sync(s.model, False)
        try:
            yield
        finally:
            set_gradient_sync(s.model, True)
    else:
        with s.train_model.no_sync():
            yield


def stop_requested(s: Session) -> bool:
    """Whether any process got SIGINT/SIGTERM (all ranks must stop at the same step to save together)."""
    flag = torch.tensor([float(s.stop.signum or 0)])
    if s.rt.distributed:
        flag = s.rt.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not s.stop.signum:
            s.stop.signum = int(flag.item())  # another rank was signalled: stop with it
    return bool(flag.item())


def non_finite(s: Session, step: int, loss: float, grad_norm: float) -> NonFiniteLoss:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    last = layout.newest_checkpoint(s.ckpt_root)
    kept = (f"the last good checkpoint {s.ckpt_root / last} is intact (resume with: {s.resume_hint})" if last
            else "no checkpoint had been saved yet")
    return NonFiniteLoss(f"non-finite {what} at step {step}: training stopped before the optimizer step; {kept}. "
                         f"{likely_cause(s)}")


def likely_cause(s: Session) -> str:
    """Where to look: an update gone wrong (the learning rate) only if this run has updated the weights."""
    bad = next((n for n, p in s.model.named_parameters()
                if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())), None)
    lr = f"lower train.lr (now {s.recipe.train.lr}) or train.grad_clip"
    if s.steps_this_run == 0:
        if s.step > 0:
            start = "the checkpoint this run resumed"
        elif s.command == "finetune" and s.recipe.finetune.init_from:
            start = f"the starting weights (finetune.init_from = {s.recipe.finetune.init_from})"
        else:
            start = f"the initialisation (model.init_std = {s.recipe.model.init_std})"
        state = f"the weights are already non-finite ({bad})" if bad else "the untouched weights already give it"
        return (f"This happened before any update of this run, so it is not the learning rate: {state}; check "
                f"{start}, the model settings (model.norm_eps, model.rope_theta) and the data")
    if bad:
        return f"The weights became non-finite ({bad}) in an update: {lr}"
    return f"{lr[0].upper()}{lr[1:]}, or check the data"


# ---------------------------------------------------------------------------------------- evaluation


def evaluate(s: Session, data) -> dict[str, float]:
    """Loss, perplexity, bits per byte (and exact match for answer rows) on the fixed validation batches, scored
    by lm2cli.scoring with the loss the training steps minimise.

    Each rank scores its share of the batches; the sums are all-reduced, so every rank returns the same numbers.
    When the data has validation groups (the lengths of a BABILong fine-tune), each group's loss, exact match
    and rows are reported too, as `val_loss@<group>`, `val_em@<group>` and `val_rows@<group>`.
    """
    model = s.model  # never the DDP/compile wrapper; under FSDP the sharded module itself
    batches = list(data.val_batches(s.rt.rank, s.rt.world))
    groups = list(data.val_groups)
    parts = [[b for b in batches if b.group == g] for g in groups] if groups else [batches]
    scores = [score_batches(model, part, s.rt.device, s.rt.autocast, loss=loss_sum, at_targets=True) for part in parts]
    if s.fsdp:  # every rank must run the same number of forwards (each gathers the shards collectively)
        most = int(s.rt.all_reduce(torch.tensor([float(len(batches))]), op=torch.distributed.ReduceOp.MAX).item())
        padding = [next(iter(data.val_batches(0, 1)))] * (most - len(batches))
        score_batches(model, padding, s.rt.device, s.rt.autocast, loss=loss_sum, at_targets=True)  # run, count nothing
    # one all-reduce for every group's sums
    summed = s.rt.all_reduce(torch.stack([sc.to_tensor(s.rt.device) for sc in scores])).cpu()
    per_group = [Scores.from_tensor(row) for row in summed]
    total = sum(per_group, Scores())
    if total.targets == 0:
        raise Lm2Error("validation found no target tokens; check the validation data")
    out = score_fields(total, "")
    if groups:
        for group, sc in zip(groups, per_group, strict=True):
            out.update(score_fields(sc, f"@{group}"))
            out[f"val_rows@{group}"] = sc.answer_rows
    return out


def score_fields(sc: Scores, suffix: str) -> dict[str, float]:
    """val_loss, val_ppl (the total only), val_bpb and val_em of one set of sums, names ending in `suffix`."""
    out = {f"val_loss{suffix}": sc.loss}
    if not suffix:
        out["val_ppl"] = sc.perplexity
    if sc.bits_per_byte is not None:
        out[f"val_bpb{suffix}"] = sc.bits_per_byte
    if sc.exact_match is not None:
        out[f"val_em{suffix}"] = sc.exact_match
    return out


def validate(s: Session, stage: Stage, data, ckpt: Path | None) -> None:
    """Evaluate and record. Running out of memory here costs a warning, not the run (it was saved first)."""
    try:
        result = evaluate(s, data)
    except torch.OutOfMemoryError:
        s.model.train()
        if s.rt.device.type == "cuda":
            torch.cuda.empty_cache()
        s.say(f"warning: validation at step {s.step} ran out of memory and was skipped; lower train.eval_batches "
              f"or train.batch_size")
        if ckpt is not None and s.rt.is_main:
            ck.update_trainer_state(ckpt, eval_pending=False)
        return
    log_eval(s, stage, result, ckpt)


def log_eval(s: Session, stage: Stage, result: dict[str, float], ckpt: Path | None) -> None:
    """Report a validation result; if it belongs to a checkpoint, record it there and update `best`."""
    parts = [f"val loss {result['val_loss']:.4f}", f"ppl {result['val_ppl']:.2f}"]
    if "val_bpb" in result:
        parts.append(f"bpb {result['val_bpb']:.4f}")
    if "val_em" in result:
        parts.append(f"exact match {result['val_em']:.1%}")
    by_group = [(key.removeprefix("val_rows@"), rows) for key, rows in result.items() if key.startswith("val_rows@")]
    if by_group and "val_em" in result:
        parts.append("by length " + " ".join(f"{g} {result[f'val_em@{g}']:.1%} ({rows})" for g, rows in by_group))
    s.say(f"{stage.label}step {s.step}: " + ", ".join(parts))
    if ckpt is None:  # the validation before a stage's first step: the start of its curve
        s.extra_state["start_val_loss"] = result["val_loss"]
    s.extra_state["last_val_loss"] = result["val_loss"]
    if s.metrics is not None:
        s.metrics.write({"kind": "val", "step": s.step, "stage": stage.index + 1, **result})
    if ckpt is None:
        return
    improved = []
    for pointer in stage.best_pointers:
        current = s.best.get(pointer)
        if current is None or result["val_loss"] < current["val_loss"]:
            s.best[pointer] = {"val_loss": result["val_loss"], "checkpoint": ckpt.name}
            improved.append(pointer)
    if s.rt.is_main:
        ck.update_trainer_state(ckpt, eval_pending=False, val=result, best=s.best)
        for pointer in improved:
            ck.write_pointer(s.ckpt_root, pointer, ckpt.name)
        ck.rotate(s.ckpt_root, s.recipe.train.keep_last, protected=set())
    s.rt.barrier()


# ------------------------------------------------------------------------------------------- saving


def trainer_state(s: Session, stage: Stage, eval_pending: bool, rng_info: dict) -> dict:
    from lm2cli.version import __version__

    tcfg = s.recipe.train
    return {
        "command": s.command, "lm2_version": __version__, "step": s.step, "stage": stage.index,
        "stage_start_step": stage.start_step, "stage_steps": stage.steps, "rows_done": s.rows_done,
        "world_size": s.rt.world, "batch_size": tcfg.batch_size, "grad_accum": tcfg.grad_accum,
        "seq_len": tcfg.seq_len, "seed": tcfg.seed, "eval_pending": eval_pending, "val": None, "best": s.best,
        "train_seconds": round(s.train_seconds, 3), "tokenizer_sha256": s.tokenizer.sha256,
        "memory_carried": s.carry is not None, "rng": rng_info, **s.extra_state,
    }


def save(s: Session, stage: Stage, eval_pending: bool) -> Path:
    """Checkpoint the current step (rank 0 writes; every rank contributes its RNG and carried memory).

    `eval_pending`: a validation is due at this step and follows the save; its result is added to the
    checkpoint's trainer_state.json afterwards, and a run resumed before that happened validates first.
    """
    from lm2cli.checkpoint import encode_carried_memory, save_model_files

    rng_tensors, rng_info = ck.capture_rng(s.rt.rank)
    gathered = s.rt.gather_objects((rng_tensors, rng_info, s.carry))
    if s.fsdp:  # collectives: every rank takes part, rank 0 receives the full tensors
        from lm2cli.training import fsdp

        model = fsdp.gathered_model(s.model, s.recipe, s.rt.rank)
        optimizer_state = fsdp.gathered_optimizer_state(s.model, s.optimizer)
    else:
        model, optimizer_state = s.model, (s.optimizer.state_dict() if s.rt.is_main else None)
    path = s.ckpt_root / layout.checkpoint_name(s.step)
    if s.rt.is_main:
        all_tensors = {k: v for t, _, _ in gathered for k, v in t.items()}
        infos = {f"rank{i}": info for i, (_, info, _) in enumerate(gathered)}
        carried = None
        if s.carry is not None:
            carried = encode_carried_memory(s.model, [c for _, _, c in gathered], s.recipe.train.batch_size)
        state = trainer_state(s, stage, eval_pending, infos)
        path = ck.save_checkpoint(s.ckpt_root, s.step, lambda d: save_model_files(d, model, s.recipe, s.tokenizer),
                                  state, optimizer_state, all_tensors, carried)
        if not eval_pending:  # else rotation waits until validation has updated the best pointers
            ck.rotate(s.ckpt_root, s.recipe.train.keep_last, protected=set())
    s.rt.barrier()
    return path


def load_model_weights(s: Session, ckpt: Path) -> None:
    """Weights of checkpoint `ckpt` into the session's model (sharded or not)."""
    if s.fsdp:
        from lm2cli.checkpoint import MODEL_FILE, check_weight_shapes
        from lm2cli.resources import meta_model
        from lm2cli.training.fsdp import load_model_file

        # names and shapes against an unsharded twin on the meta device, as load_weights does without FSDP
        check_weight_shapes(meta_model(s.recipe, s.model.args.vocab_size), ckpt / MODEL_FILE)
        load_model_file(s.model, ckpt / MODEL_FILE)
    else:
        from lm2cli.checkpoint import load_weights

        load_weights(s.model, ckpt)
