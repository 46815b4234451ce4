"""`lm2 finetune RECIPE`: supervised fine-tuning with loss on answer tokens only, through the same loop.

Starting weights (`finetune.init_from`): an lm2 checkpoint or run directory (weights only; memory modules or
RMT memory tokens missing from it start fresh: a vanilla run can start an LM2 or an RMT), a Hugging Face Llama
directory (converted by lm2cli.model.convert; its tokenizer.model is used), or nothing (random weights and the
tokenizer of `data.dir`).

Rows (assembled by lm2cli.data.examples, as `lm2 eval` assembles them):
  babilong  BOS + encode(input.strip() + " " + question.strip()) + ANSWER + encode(target.strip()) + EOS
            (babilong.md §5.3); loss on the target tokens and EOS only.
  jsonl     {"prompt", "response"} per line: BOS + encode(prompt) + encode(response) + EOS; loss on the
            response tokens and EOS.
Batches are padded on the right with PAD; padded positions carry no loss.

Curriculum (babilong): `finetune.stages = [1, 2, 4]` trains stage k on the rows of at most k x
memory.segment_len tokens, `train.steps` steps each, every stage after the first starting from the best
checkpoint (by validation loss) of the one before. The stage is stored in each checkpoint, so --resume
continues the right stage.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from lm2cli.checkpoint import TOKENIZER_FILE
from lm2cli.data.examples import Example, load_examples
from lm2cli.errors import Lm2Error
from lm2cli.scoring import IGNORE
from lm2cli.training.curriculum import STATE_KEY, FactSchedule, describe_start, most_facts, rows_up_to
from lm2cli.training.cursor import RowOrder, spread_indices
from lm2cli.training.driver import run_stages
from lm2cli.training.runtime import distributed_run, set_determinism
from lm2cli.training.session import dry_run_report, info, open_session, plan_run, warn, with_vocab
from lm2cli.training.types import Batch, Stage

HELD_OUT_SHARE = 0.1  # share of `finetune.data` held out for validation when finetune.val_data is empty


# ------------------------------------------------------------------------------------------- batches


class FinetuneData:
    """Rows of one curriculum stage (those that fit its token budget), in a seeded order per epoch."""

    def __init__(self, train: list[Example], val: list[Example], budget: int, recipe, tokenizer, stage: int,
                 label: str, world: int = 1):
        t = recipe.train
        self.batch_size, self.pad_id = t.batch_size, tokenizer.pad_id
        self.train = [e for e in train if len(e) <= budget]
        self.left_out = len(train) - len(self.train)
        fitting_val = sorted((e for e in val if len(e) <= budget), key=len)
        if not self.train:
            shortest = min(len(e) for e in train)
            hint = ("build longer rows with `lm2 babilong` (larger babilong.lengths)" if recipe.finetune.format ==
                    "babilong" else "raise train.seq_len")
            raise Lm2Error(f"{label}no training row fits {budget} tokens (the shortest has {shortest}); {hint}")
        if not fitting_val:
            raise Lm2Error(f"{label}no validation row fits {budget} tokens; check finetune.val_data")
        wanted = t.eval_batches * t.batch_size * world  # global batches: the same rows for any world size
        self.val = [fitting_val[i] for i in spread_indices(len(fitting_val), wanted)]
        groups = list(dict.fromkeys(e.group for e in self.val))  # in the order of each group's shortest row
        self.val_groups = tuple(groups) if len(groups) > 1 else ()
        self.val_chunks = self.group_chunks()
        self.order = RowOrder(len(self.train), (t.seed, stage))
        self.budget = budget

    fixed_rows = False  # rows are padded to the longest of their batch

    @property
    def row_tokens(self) -> int:
        return max(len(e) for e in self.train) - 1

    @property
    def n_rows(self) -> int:
        return len(self.train)

    def describe(self) -> str:
        lengths = np.array([len(e) for e in self.train])
        left_out = f" ({self.left_out:,} longer rows left out)" if self.left_out else ""
        return (f"{len(self.train):,} training rows of at most {self.budget} tokens{left_out} (mean "
                f"{lengths.mean():.0f}, max {lengths.max()}), {len(self.val)} validation rows")

    def epoch_at(self, rows_done: int) -> float:
        return rows_done / len(self.train)

    def collate(self, examples: list[Example]) -> Batch:
        """Right-padded inputs and targets; only answer positions (and EOS) carry a target."""
        width = max(len(e) for e in examples) - 1
        inputs = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            ids = torch.tensor(e.prompt + e.answer, dtype=torch.long)
            inputs[i, :len(ids) - 1] = ids[:-1]
            # Position j predicts token j + 1: answer tokens start at index len(prompt).
            targets[i, len(e.prompt) - 1:len(ids) - 1] = ids[len(e.prompt):]
        return Batch(inputs, targets, n_tokens=sum(len(e) - 1 for e in examples), answers=True,
                     group=examples[0].group)

    def batch(self, first_row: int, count: int) -> Batch:
        return self.collate([self.train[i] for i in self.order.rows(first_row, count)])

    def group_chunks(self) -> list[list[Example]]:
        """The validation rows in batches of batch_size, each batch one group's rows (so a group's scores are the
        sum of its batches); with a single group, the rows cut in order."""
        size, chunks = self.batch_size, []
        for group in dict.fromkeys(e.group for e in self.val):
            rows = [e for e in self.val if e.group == group]
            chunks.extend(rows[i:i + size] for i in range(0, len(rows), size))
        return chunks

    def val_batches(self, rank: int, world: int):
        for b in range(rank, len(self.val_chunks), world):
            yield self.collate(self.val_chunks[b])


class FactCurriculumData(FinetuneData):
    """FinetuneData whose training rows are those allowed by the fact curriculum's current maximum
    (lm2cli.training.curriculum): after each step the loop reports the step's exact match (`after_step`), and a
    step-up swaps in the rows of one more fact, in their own seeded order from that point of the data cursor.
    The schedule's state is kept current in `store` (the session's extra trainer state), so every checkpoint
    holds it."""

    def __init__(self, train: list[Example], val: list[Example], budget: int, recipe, tokenizer, stage: int,
                 label: str, world: int, schedule: FactSchedule, store: dict):
        self.all_train, self.tokenizer, self.schedule, self.store = train, tokenizer, schedule, store
        first = rows_up_to(train, schedule.current, tokenizer)
        if not first:
            raise Lm2Error(f"finetune.facts_start = {recipe.finetune.facts_start}: no training row has at most "
                           f"{schedule.current} facts or can be cut to them (its answer needs later facts); raise "
                           f"finetune.facts_start")
        super().__init__(first, val, budget, recipe, tokenizer, stage, label, world)
        self.order_seed = (recipe.train.seed, stage)
        self.order = self.level_order()
        store[STATE_KEY] = schedule.state()

    def level_order(self) -> RowOrder:
        return RowOrder(len(self.train), (*self.order_seed, self.schedule.current))

    def batch(self, first_row: int, count: int) -> Batch:
        rows = self.order.rows(first_row - self.schedule.level_rows, count)
        return self.collate([self.train[i] for i in rows])

    def describe(self) -> str:
        return f"{super().describe()}; {describe_start(self.schedule, len(self.train))}"

    def after_step(self, rows_done: int, correct: int, rows: int) -> dict | None:
        earned = self.schedule.observe(correct, rows, rows_done)
        self.store[STATE_KEY] = self.schedule.state()
        if earned is None:
            return None
        examples = rows_up_to(self.all_train, self.schedule.current, self.tokenizer)
        self.train = [e for e in examples if len(e) <= self.budget]
        self.left_out = len(examples) - len(self.train)
        self.order = self.level_order()
        return {"message": f"fact curriculum: training exact match {earned:.1%} over the last "
                           f"{self.schedule.window} steps; rows now have up to {self.schedule.current} facts "
                           f"({len(self.train):,} rows)",
                "facts_max": self.schedule.current, "train_em": earned, "rows": len(self.train)}


def split_examples(recipe, tokenizer) -> tuple[list[Example], list[Example], str]:
    """(training rows, validation rows, where validation comes from); finetune.replay_data's rows are appended to
    the training rows after any hold-out, so they never validate."""
    f = recipe.finetune
    train, val, source = _train_and_val(recipe, tokenizer)
    if f.replay_data:
        try:
            replay = load_examples(recipe, tokenizer, f.replay_data, keep_rows=f.facts_start > 0)
        except Lm2Error as e:
            raise Lm2Error(f"finetune.replay_data = \"{f.replay_data}\": {e}") from None
        source = f"of them {len(replay):,} replayed from {f.replay_data}; {source}"
        train = train + replay
    return train, val, source


def _train_and_val(recipe, tokenizer) -> tuple[list[Example], list[Example], str]:
    f = recipe.finetune
    train = load_examples(recipe, tokenizer, f.data, keep_rows=f.facts_start > 0)
    if f.val_data:
        return train, load_examples(recipe, tokenizer, f.val_data), f"validation: {f.val_data}"
    if len(train) < 2:
        raise Lm2Error(f"{f.data}: only {len(train)} row; set finetune.val_data or provide more rows")
    perm = np.random.default_rng([recipe.train.seed, 7]).permutation(len(train))
    n_val = max(1, int(len(train) * HELD_OUT_SHARE))
    held = set(perm[:n_val].tolist())
    return ([e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)],
            f"validation: {n_val} rows held out of {f.data} ({HELD_OUT_SHARE:.0%}, finetune.val_data is empty)")


def stage_budgets(recipe) -> list[int]:
    f = recipe.finetune
    if f.format == "jsonl":
        if len(f.stages) > 1:
            raise Lm2Error(f"finetune.stages = {f.stages}: curriculum stages apply to format = \"babilong\"; "
                           f"jsonl rows are limited by train.seq_len (use stages = [1])")
        return [recipe.train.seq_len + 1]
    return [k * recipe.memory.segment_len for k in f.stages]


# -------------------------------------------------------------------------------------- starting weights


def resolve_start(recipe, rt, verify_checksums: bool = True):
    """(recipe, tokenizer, weights loader) for finetune.init_from; the loader fills a built model."""
    from lm2cli.data.tokenizer import Tokenizer

    src = recipe.finetune.init_from
    answer = recipe.tokenizer.answer_token
    if not src:
        tok_path = Path(recipe.data.dir) / TOKENIZER_FILE
        if not tok_path.is_file():
            raise Lm2Error(f"finetune.init_from is empty and {tok_path} does not exist: set finetune.init_from to "
                           f"a checkpoint, or run `lm2 tokenize RECIPE` to make a tokenizer")
        info(rt, f"starting from random weights (finetune.init_from is empty); tokenizer {tok_path}")
        return recipe, Tokenizer.load(tok_path, answer_token=answer), None
    path = Path(src)
    if not path.exists():
        raise Lm2Error(f"finetune.init_from = \"{src}\": no such file or directory")
    if (path / "config.json").is_file():
        return _start_from_hf(recipe, rt, path, answer)
    return _start_from_lm2(recipe, rt, path, verify_checksums)


def _start_from_lm2(recipe, rt, path: Path, verify_checksums: bool = True):
    from lm2cli.checkpoint import find_checkpoint, load_recipe_of, load_tokenizer_of, read_weights, verify_checkpoint
    from lm2cli.training.session import compare_recipes

    ckpt = find_checkpoint(path, recipe.finetune.init_checkpoint)
    verify_checkpoint(ckpt, checksums=verify_checksums)
    saved = load_recipe_of(ckpt)
    tokenizer = load_tokenizer_of(ckpt)
    recipe = with_vocab(recipe, tokenizer.vocab_size)
    # A vanilla backbone can take a memory: LM2's modules, or RMT's memory tokens (RMT's papers add them to a
    # pretrained decoder). The backbone must match; the memory keys are new by design and start fresh.
    adding_memory = saved.model.arch == "vanilla" and recipe.model.arch in ("lm2", "rmt")
    if adding_memory:
        saved = dataclasses.replace(saved, model=dataclasses.replace(saved.model, arch=recipe.model.arch),
                                    memory=recipe.memory)
    for w in compare_recipes(saved, recipe, ckpt):
        if w.split(" ", 1)[0].startswith(("model.", "memory.", "attention.")):
            warn(rt, w)

    def load(model) -> None:
        load_partial(model, read_weights(ckpt), str(ckpt), rt)

    info(rt, f"starting from {ckpt}{_which_of_the_run(path, ckpt, recipe.finetune.init_checkpoint)}, weights only")
    return recipe, tokenizer, load


def _which_of_the_run(given: Path, ckpt: Path, wanted: str) -> str:
    """Why `ckpt` was taken when `given` named a run: a continuation from an early `best` should not surprise."""
    from lm2cli.checkpoint import is_checkpoint_dir, read_pointer

    if is_checkpoint_dir(given):
        return ""
    if wanted == "latest":
        return ' (the run\'s newest: finetune.init_checkpoint = "latest")'
    if read_pointer(ckpt.parent, "best") == ckpt.name:
        return (' (the run\'s best by validation loss; finetune.init_checkpoint = "latest" takes its newest, '
                'or name a checkpoint directory)')
    return " (the run's newest: it has no best pointer)"


def _start_from_hf(recipe, rt, path: Path, answer_token: str):
    from lm2cli.data.tokenizer import Tokenizer
    from lm2cli.model.convert import llama_from_hf, read_hf_llama_dir, recipe_overrides_from_hf_config
    from lm2cli.recipe import parse_override

    tok_path = path / "tokenizer.model"
    if not tok_path.is_file():
        raise Lm2Error(f"{path}: no tokenizer.model (SentencePiece); lm2 needs the model's SentencePiece tokenizer "
                       f"(tokenizer.json-only models are not supported)")
    tokenizer = Tokenizer.load(tok_path, answer_token=answer_token)
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Lm2Error(f"{path / 'config.json'}: invalid JSON ({e})") from None
    overrides = recipe_overrides_from_hf_config(cfg, str(path / "config.json"))
    model_cfg = recipe.model
    for text in overrides:
        _, key, value = parse_override(text)
        model_cfg = dataclasses.replace(model_cfg, **{key: value})
    recipe = dataclasses.replace(recipe, model=model_cfg)
    info(rt, f"starting from Hugging Face Llama weights in {path}; backbone shapes from its config.json: "
             + ", ".join(o.split(".", 1)[1] for o in overrides))
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise Lm2Error(f"{tok_path} has {tokenizer.vocab_size} pieces but config.json's vocab_size is "
                       f"{recipe.model.vocab_size}")

    def load(model) -> None:  # the weights are read only when a fresh run needs them (not on --resume)
        from lm2cli.checkpoint import refuse_non_finite

        hf_cfg, hf_state = read_hf_llama_dir(path)
        state = llama_from_hf(hf_state, hf_cfg)
        refuse_non_finite(state, str(path))
        load_partial(model, state, str(path), rt)

    return recipe, tokenizer, load


def load_partial(model, state: dict[str, torch.Tensor], where: str, rt) -> None:
    """Load `state` (finite, see lm2cli.checkpoint.read_weights) into `model`; parameters it lacks may only be
    memory ones (they keep their fresh init).

    Tied weights (embedding = output projection) are stored once; any name of a shared tensor counts.
    """
    own = model.state_dict(keep_vars=True)
    unexpected = sorted(k for k in state if k not in own)
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if unexpected or wrong:
        detail = "; ".join(([f"unexpected: {', '.join(unexpected[:5])}"] if unexpected else [])
                           + ([f"shape mismatch: {', '.join(wrong[:3])}"] if wrong else []))
        raise Lm2Error(f"{where}: weights do not fit the recipe's model ({detail})")
    provided = {id(own[k]) for k in state}
    missing = sorted(k for k, v in own.items() if id(v) not in provided)
    bad = [k for k in missing if not model.is_memory_param(k)]
    if bad:
        raise Lm2Error(f"{where}: weights lack backbone parameters {', '.join(bad[:5])}; the recipe's model differs "
                       f"from the checkpoint's")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    if missing:
        blocks = sorted({k.split(".")[1] for k in missing if k.startswith("blocks.")}, key=int)
        info(rt, f"new (freshly initialised) memory parameters: {len(missing)} tensors"
                 + (f" in blocks {', '.join(blocks)}" if blocks else "") + f" ({', '.join(missing[:3])}, ...)")


# ------------------------------------------------------------------------------------------ the command


def finetune_command(recipe, recipe_path: Path | None = None, resume: bool = False,
                     resume_from: Path | None = None, dry_run: bool = False, verify_checksums: bool = True) -> None:
    with distributed_run(recipe.train) as rt:
        _finetune(recipe, rt, resume, resume_from, dry_run, verify_checksums)


def _finetune(recipe, rt, resume, resume_from, dry_run, verify_checksums=True) -> None:
    from lm2cli.model import build_model
    from lm2cli.resources import check_training_fits

    info(rt, rt.reason)
    plan = plan_run(recipe, "finetune", resume, resume_from, rt, dry_run, verify_checksums)
    recipe, tokenizer, load_start = resolve_start(recipe, rt, verify_checksums)
    recipe = with_vocab(recipe, tokenizer.vocab_size)
    check_training_fits(recipe, tokenizer.vocab_size, rt)
    train_rows, val_rows, val_note = split_examples(recipe, tokenizer)
    info(rt, f"finetune data: {len(train_rows):,} training rows from {recipe.finetune.data}; {val_note}")
    budgets = stage_budgets(recipe)
    stages = make_stages(recipe, budgets)
    set_determinism(recipe.train.deterministic, rt.device)
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe, tokenizer.vocab_size)
    if plan.resume_from is None and load_start is not None:
        load_start(model)
    s = open_session("finetune", recipe, rt, tokenizer, model, plan,
                     extra_state={"init_from": recipe.finetune.init_from})

    schedule = fact_schedule(recipe, train_rows, plan)

    def data_for(stage: Stage) -> FinetuneData:
        args = (budgets[stage.index], recipe, tokenizer, stage.index, stage.label, rt.world)
        if schedule is None:
            d = FinetuneData(train_rows, val_rows, *args)
        else:
            d = FactCurriculumData(train_rows, val_rows, *args, schedule=schedule, store=s.extra_state)
        info(rt, f"{stage.label}{d.describe()}")
        return d

    if dry_run:
        dry_run_report(s, data_for(stages[s.stage]), stages[s.stage])
        return
    run_stages(s, plan, stages, data_for)


def fact_schedule(recipe, train_rows: list[Example], plan) -> FactSchedule | None:
    """The fact curriculum (finetune.facts_start > 0), where the resumed checkpoint left it."""
    if not recipe.finetune.facts_start:
        return None
    schedule = FactSchedule.start(recipe, most_facts(train_rows, recipe.finetune.data))
    saved = (plan.state or {}).get(STATE_KEY)
    if saved is not None:
        from lm2cli.checkpoint import STATE_FILE

        schedule.restore(saved, str(plan.resume_from / STATE_FILE))
    return schedule


def make_stages(recipe, budgets: list[int]) -> list[Stage]:
    n, steps = len(budgets), recipe.train.steps
    out = []
    for i in range(n):
        label = f"[stage {i + 1}/{n}, {recipe.finetune.stages[i]} segments] " if n > 1 else ""
        pointers = ("best", f"best_stage_{i + 1}")  # per stage, so a finished run can gain stages later
        out.append(Stage(index=i, start_step=i * steps, steps=steps, label=label, best_pointers=pointers))
    return out
