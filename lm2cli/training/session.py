"""Setting up a training run, shared by pretrain and finetune: the run directory (fresh or resumed), the
model on its device, the optimizer, torch.compile / DDP wrapping, and restoring a checkpoint exactly.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lm2cli import checkpoint as layout
from lm2cli.checkpoint import RECIPE_FILE, find_checkpoint
from lm2cli.errors import Lm2Error
from lm2cli.fileio import atomic_write_text
from lm2cli.recipe import Recipe, section_fields, sections, toml_value
from lm2cli.scoring import IGNORE
from lm2cli.training import checkpoints as ck
from lm2cli.training.loop import forward_loss, load_model_weights, to_device
from lm2cli.training.metrics import Console, MetricsLog, fmt_duration, truncate_after
from lm2cli.training.optim import build_optimizer
from lm2cli.training.runtime import Runtime, StopRequest
from lm2cli.training.types import Session, Stage

# Keys that decide parameter shapes: a checkpoint built with other values cannot be loaded.
SHAPE_KEYS = {
    "model.arch", "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads",
    "model.ffn_hidden", "model.ffn_multiple_of", "model.tie_embeddings",
    "memory.slots", "memory.slot_dim", "memory.heads", "memory.layers", "memory.init",
}
# Keys that only say where things go or how long to run: a change is expected on resume, not worth a warning.
QUIET_KEYS = {"output.dir", "output.tensorboard", "train.eval_every", "train.save_every",
              "train.keep_last", "train.log_every", "train.eval_batches", "train.device", "data.workers"}


def info(rt: Runtime, text: str) -> None:
    if rt.is_main:
        print(text, flush=True)


def warn(rt: Runtime, text: str) -> None:
    if rt.is_main:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def with_vocab(recipe: Recipe, vocab_size: int) -> Recipe:
    """The recipe with model.vocab_size filled in, so checkpoints state their shapes explicitly."""
    if recipe.model.vocab_size:
        return recipe
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, vocab_size=vocab_size))


def resume_hint(command: str, run_dir: Path) -> str:
    """The command that resumes this run: the run's own resolved recipe carries every override and --out."""
    return " ".join(shlex.quote(a) for a in ["lm2", command, str(run_dir / RECIPE_FILE), "--resume"])


# -------------------------------------------------------------------------------------- run directory


@dataclass
class RunPlan:
    run_dir: Path
    resume_from: Path | None  # checkpoint directory to restore, None = fresh start
    state: dict | None  # its trainer_state.json


def plan_run(recipe: Recipe, command: str, resume: bool, resume_from: Path | None, rt: Runtime,
             dry_run: bool = False, checksums: bool = True) -> RunPlan:
    """Decide between a fresh start and resuming, refusing to start fresh over existing checkpoints. The
    checkpoint to resume is verified against its manifest (sha256 too unless `checksums` is False)."""
    from lm2cli.outdir import RUN, check_output_dir

    run_dir = check_output_dir(recipe.output.dir, "output.dir", RUN, probe=not dry_run)
    root = run_dir / layout.CHECKPOINTS
    if resume_from is not None:
        ckpt = find_checkpoint(resume_from, given_as="--resume-from")
    elif resume:
        name = layout.newest_checkpoint(root)
        if name is None:
            info(rt, f"--resume: no checkpoint in {root} yet; starting a fresh run")
            return RunPlan(run_dir, None, None)
        ckpt = root / name
    else:
        existing = layout.list_checkpoints(root)
        if existing and not dry_run:
            raise Lm2Error(f"{run_dir} already has checkpoints (newest: {existing[-1]}); continue it with "
                           f"`lm2 {command} RECIPE --resume`, or start a new run elsewhere with --out DIR")
        return RunPlan(run_dir, None, None)
    state = ck.read_trainer_state(ckpt, checksums=checksums)
    if state.get("command") != command:
        raise Lm2Error(f"checkpoint {ckpt} was written by `lm2 {state.get('command')}`, not `lm2 {command}`; "
                       f"to start {command} from its weights use finetune.init_from = \"{ckpt}\"")
    return RunPlan(run_dir, ckpt, state)


def prepare_run_dir(s: Session, recipe_text: str, resumed: bool) -> None:
    """Create the run directory, write the resolved recipe, and trim metrics redone after a resume (or all
    of them on a fresh start: they can only come from an earlier attempt that never saved a checkpoint)."""
    if not s.rt.is_main:
        return
    from lm2cli.fileio import remove_stale_temp_files

    s.run_dir.mkdir(parents=True, exist_ok=True)
    s.ckpt_root.mkdir(exist_ok=True)
    stale = ck.remove_stale_tmp(s.ckpt_root) + remove_stale_temp_files(s.run_dir)
    if stale:  # the console is not up yet: print directly
        info(s.rt, f"removed what an interrupted save left behind: {', '.join(stale)}")
    atomic_write_text(s.run_dir / RECIPE_FILE, recipe_text)
    if resumed:
        truncate_after(s.run_dir, s.step, s.stage + 1)
    else:
        truncate_after(s.run_dir, -1)


# --------------------------------------------------------------------------------- recipe comparison


def _flat(recipe: Recipe) -> dict[str, Any]:
    return {f"{sec}.{key}": getattr(getattr(recipe, sec), key)
            for sec, cls in sections().items() for key in section_fields(cls)}


def compare_recipes(saved: Recipe, current: Recipe, where: Path) -> list[str]:
    """Raise for shape-determining differences (naming each key); return warnings for the others."""
    old, new = _flat(saved), _flat(current)
    arch = current.model.arch
    errors, warnings = [], []
    for key in old:
        if old[key] == new[key] or key in QUIET_KEYS:
            continue
        if key.startswith("memory.") and arch != "lm2" and key not in ("memory.slots",):
            continue  # memory shape keys only matter for arch = lm2 (slots also sizes RMT memory tokens)
        change = f"{key} = {toml_value(old[key])} in the checkpoint, {toml_value(new[key])} now"
        (errors if key in SHAPE_KEYS else warnings).append(change)
    if errors:
        raise Lm2Error(f"checkpoint {where} does not fit this recipe: {'; '.join(errors)} (these keys decide "
                       f"parameter shapes; use the checkpoint's values or start a new run)")
    return [f"{w}; using the new value" for w in warnings]


# ----------------------------------------------------------------------------------------- the model


def place_model(model: torch.nn.Module, recipe: Recipe, rt: Runtime) -> torch.nn.Module:
    model.to(rt.device)
    if recipe.train.activation_checkpointing:
        model.set_activation_checkpointing(True)
    model.train()
    return model


def wrap_for_training(model: torch.nn.Module, recipe: Recipe, rt: Runtime, fsdp: bool,
                      command: str = "pretrain") -> torch.nn.Module:
    """The module the training step calls: optionally compiled, DDP-wrapped under torchrun (FSDP shards the
    model in place before the optimizer is built, see open_session).

    The plain `model` stays what is saved and evaluated: DDP's state dict has `module.` prefixes (which broke
    resume and sampling in other toolkits). Compilation is block by block and kept inside the model
    (`compile_blocks`): no `_orig_mod.` prefixes, one compilation for every block, validation stays eager.
    """
    train_model = model
    if recipe.train.compile:
        model.compile_blocks()
    if rt.distributed and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        # State tensors take no gradient from the loss. But a row of at most one memory segment writes nothing
        # that is read (a training step skips the write at its end), so a batch of such rows leaves the slot
        # bank's write-only weights without a gradient: fine-tuning on short rows (0k BABILong), or pretraining
        # with train.seq_len <= memory.segment_len. DDP must then search for unused parameters each step, or it
        # stops ("did not receive grad"); otherwise every parameter is used and the search is skipped.
        may_skip_writes = model.has_write_only_params and (
            command == "finetune" or recipe.train.seq_len <= recipe.memory.segment_len)
        train_model = DDP(train_model, device_ids=ids, find_unused_parameters=may_skip_writes)
    return train_model


def new_optimizer(model: torch.nn.Module, recipe: Recipe, rt: Runtime, announce: bool = True):
    opt, summary = build_optimizer(model, recipe.train, model.is_memory_param, rt.device.type)
    if announce:
        rows = ", ".join(f"{g.name} {g.params:,} ({g.tensors} tensors, wd {g.weight_decay:g}, lr x{g.lr_mult:g})"
                         for g in summary)
        info(rt, f"optimizer: AdamW betas ({recipe.train.beta1}, {recipe.train.beta2}); groups: {rows}")
    return opt


def describe_model(model, rt: Runtime) -> None:
    rep = model.param_report()
    info(rt, f"model: {model.args.arch}, {rep['total']:,} parameters (backbone {rep['backbone']:,} of which "
             f"embedding {rep['embedding']:,}; memory {rep['memory']:,})")


def open_session(command: str, recipe: Recipe, rt: Runtime, tokenizer, model: torch.nn.Module, plan: RunPlan,
                 extra_state: dict | None = None) -> Session:
    """Everything the loop needs, on the right device, restored from `plan.resume_from` when resuming."""
    place_model(model, recipe, rt)
    describe_model(model, rt)
    flops = model.flops_per_token(recipe.train.seq_len)
    fsdp = rt.distributed and recipe.train.distributed == "fsdp"
    if fsdp:
        from lm2cli.training.fsdp import shard

        shard(model)
        info(rt, f"FSDP: parameters, gradients and optimizer state sharded over {rt.world} processes "
                 f"(one unit per decoder block)")
    elif recipe.train.distributed == "fsdp" and not rt.distributed:
        info(rt, "train.distributed = \"fsdp\" takes effect under torchrun with several processes; one process "
                 "trains unsharded")
    optimizer = new_optimizer(model, recipe, rt)
    s = Session(command=command, recipe=recipe, rt=rt, model=model, train_model=model, optimizer=optimizer,
                tokenizer=tokenizer, run_dir=plan.run_dir, console=Console(False, 1, 0, command), metrics=None,
                stop=StopRequest(), resume_hint=resume_hint(command, plan.run_dir), flops_per_token=flops,
                extra_state=dict(extra_state or {}), fsdp=fsdp)
    if plan.resume_from is not None:
        restore(s, plan.resume_from, plan.state)
    s.train_model = wrap_for_training(model, recipe, rt, fsdp, command)
    return s


def begin_logging(s: Session, recipe_text: str, total_steps: int, resumed: bool) -> None:
    """Create the run directory and start the metrics files and the console (rank 0)."""
    prepare_run_dir(s, recipe_text, resumed)
    s.console = Console(s.rt.is_main, total_steps, s.step, s.command)
    if s.rt.is_main:
        s.metrics = MetricsLog(s.run_dir, s.recipe.output.tensorboard)
    s.rt.barrier()
    s.stop.install()


def end_logging(s: Session) -> None:
    s.stop.uninstall()
    s.console.close()
    if s.metrics is not None:
        s.metrics.close()
        s.metrics = None


# ------------------------------------------------------------------------------------------- restore


def restore(s: Session, ckpt: Path, state: dict) -> None:
    """Put the session exactly where checkpoint `ckpt` left off: weights, optimizer, RNG, cursor, memory."""
    from lm2cli.checkpoint import load_recipe_of

    saved = load_recipe_of(ckpt)
    for w in compare_recipes(saved, s.recipe, ckpt):
        warn(s.rt, w)
    if state.get("tokenizer_sha256") != s.tokenizer.sha256:
        raise Lm2Error(f"checkpoint {ckpt} was trained with another tokenizer than {s.tokenizer.where} "
                       f"(sha256 differs); resume on the data it was trained on")
    then, now = state.get("data_fingerprint"), s.extra_state.get("data_fingerprint")
    if then and now and then != now:
        warn(s.rt, f"the token shards in {s.recipe.data.dir} were rebuilt since checkpoint {ckpt} (fingerprint "
                   f"differs): training continues at the same row number of different data")
    load_model_weights(s, ckpt)
    if s.fsdp:
        from lm2cli.training.fsdp import load_optimizer

        load_optimizer(s.model, s.optimizer, ckpt)
    else:
        ck.load_optimizer_state(s.optimizer, ckpt, ck.optimizer_param_names(s.model, s.optimizer))
    s.step, s.rows_done, s.stage = int(state["step"]), int(state["rows_done"]), int(state.get("stage", 0))
    s.best = dict(state.get("best") or {})
    s.train_seconds = float(state.get("train_seconds", 0.0))
    if state.get("world_size") == s.rt.world:
        tensors, _ = ck.load_safetensors(ckpt, ck.RNG_FILE)
        ck.restore_rng(s.rt.rank, tensors, state["rng"][f"rank{s.rt.rank}"], ckpt)
    else:
        warn(s.rt, f"checkpoint {ckpt} was written by {state.get('world_size')} processes, this run has "
                   f"{s.rt.world}: random-number states start fresh (data order is unaffected)")
    if state.get("memory_carried") and s.recipe.memory.carry:
        restore_carried_memory(s, ckpt)
    info(s.rt, f"resumed from {ckpt} (step {s.step}, {s.rows_done:,} rows into the data)")


def restore_carried_memory(s: Session, ckpt: Path) -> None:
    """The memory this process carried into its next batch (memory.carry = true), checked against the model.

    A vanilla model carries nothing but the start of a new sequence, which is what no state means too.
    """
    from lm2cli.checkpoint import read_carried_memory

    carried = read_carried_memory(ckpt, s.model)
    if s.model.args.arch == "vanilla":
        return
    if carried.ranks != s.rt.world:
        warn(s.rt, f"the carried memory was saved by {carried.ranks} processes, this run has {s.rt.world}; it "
                   f"starts fresh")
    elif carried.batch_size != s.recipe.train.batch_size:
        warn(s.rt, f"the carried memory holds {carried.batch_size} rows per process, train.batch_size is now "
                   f"{s.recipe.train.batch_size}; it starts fresh")
    else:
        s.carry = carried.state_for(s.model, s.rt.rank, s.rt.device)


# --------------------------------------------------------------------------------------------- dry run


def dry_run_report(s: Session, data, stage: Stage) -> None:
    """Derived sizes, a memory estimate and one timed forward/backward pass; writes nothing."""
    from lm2cli.resources import check_training_fits, fmt_bytes

    r, t, rt = s.recipe, s.recipe.train, s.rt
    rows_per_step = t.batch_size * t.grad_accum * rt.world
    row_tokens = data.row_tokens
    up_to = "" if data.fixed_rows else "up to "
    tokens_per_step = rows_per_step * row_tokens
    info(rt, f"step: {t.batch_size} rows x {up_to}{row_tokens} tokens x {t.grad_accum} micro-steps x {rt.world} "
             f"process(es) = {up_to}{tokens_per_step:,} tokens per optimizer step")
    if r.model.arch != "vanilla":
        segments = row_tokens / r.memory.segment_len if data.fixed_rows else -(-row_tokens // r.memory.segment_len)
        info(rt, f"memory: {up_to}{segments:g} segments of {r.memory.segment_len} tokens "
                 f"per row, bptt {r.memory.bptt or 'all'} segments, carry {'on' if r.memory.carry else 'off'}")
    n_rows = getattr(data, "n_rows", None)
    epochs = f" = {stage.steps * rows_per_step / n_rows:.2f} epochs" if n_rows else ""
    info(rt, f"run: {stage.steps} steps x {up_to}{tokens_per_step:,} = {up_to}{stage.steps * tokens_per_step:,} tokens"
             f"{epochs}; "
             f"warm-up {t.warmup_steps} steps, lr {t.lr:g} -> {t.min_lr:g} (cosine)")
    est = check_training_fits(r, s.model.args.vocab_size, rt)
    info(rt, f"memory estimate (a lower bound, per process): {fmt_bytes(est.total)} = {est.describe()}")
    batch = to_device(data.batch(s.rows_done, t.batch_size), rt.device)
    timings = []
    for _ in range(2):  # the first pass pays for allocation and lazy initialisation
        t0 = time.perf_counter()
        loss, _, _ = forward_loss(s, batch, s.train_model)
        (loss / max(1, int((batch.targets != IGNORE).sum()))).backward()
        rt.sync()
        timings.append(time.perf_counter() - t0)
    s.optimizer.zero_grad(set_to_none=True)
    dt = timings[-1]
    tok_s = batch.n_tokens / dt
    per_step = dt * t.grad_accum
    info(rt, f"forward+backward of one micro-batch: {dt:.3f} s, {tok_s:,.0f} tok/s per process, loss "
             f"{float(loss.detach()) / max(1, int((batch.targets != IGNORE).sum())):.4f}; {stage.steps} steps ~ "
             f"{fmt_duration(per_step * stage.steps)} without validation")
    info(rt, "dry run: nothing was written")
