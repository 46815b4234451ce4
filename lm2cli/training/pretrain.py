"""`lm2 pretrain RECIPE`: next-token training on the token shards written by `lm2 tokenize`.

Rows are windows of `train.seq_len + 1` tokens laid over the train shard (BOS-aligned where possible, see
cursor.py), visited in a seeded order per epoch. Validation uses fixed windows spread evenly over the val
shard and reports loss, perplexity and bits per byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lm2cli.errors import Lm2Error
from lm2cli.training.cursor import RowOrder, plan_windows, spread_indices
from lm2cli.training.driver import run_stages
from lm2cli.training.runtime import distributed_run, set_determinism
from lm2cli.training.session import dry_run_report, info, open_session, plan_run, warn, with_vocab
from lm2cli.training.types import Batch, Stage


class PretrainData:
    """Train rows and fixed validation rows over the token shards."""

    def __init__(self, shards, recipe, tokenizer, world: int = 1):
        t = recipe.train
        self.batch_size, self.seq_len = t.batch_size, t.seq_len
        self.shards = shards
        self.train_tokens = shards.split("train")
        offsets = np.asarray(shards.doc_offsets("train"), dtype=np.int64)
        self.plan = plan_windows(len(self.train_tokens), offsets[:-1], t.seq_len)
        if len(self.plan) == 0:
            raise Lm2Error(f"the train split in {shards.dir} has {len(self.train_tokens):,} tokens, fewer than one "
                           f"row of train.seq_len + 1 = {t.seq_len + 1}; lower train.seq_len or add data")
        self.order = RowOrder(len(self.plan), t.seed)
        self.val_tokens = shards.split("val")
        val_offsets = np.asarray(shards.doc_offsets("val"), dtype=np.int64)
        val_plan = plan_windows(len(self.val_tokens), val_offsets[:-1], t.seq_len)
        if len(val_plan) == 0:
            raise Lm2Error(f"the val split in {shards.dir} has {len(self.val_tokens):,} tokens, fewer than one row "
                           f"of train.seq_len + 1 = {t.seq_len + 1}; raise data.val_fraction or lower train.seq_len")
        # eval_batches counts global batches (batch_size x processes), so every world size sees the same rows
        wanted = t.eval_batches * t.batch_size * world
        self.val_starts = val_plan.starts[spread_indices(len(val_plan), wanted)]
        self.byte_lengths = tokenizer.token_byte_lengths()

    def describe(self) -> list[str]:
        lines = [f"train: {len(self.train_tokens):,} tokens; {self.plan.describe()}",
                 f"val: {len(self.val_tokens):,} tokens; {len(self.val_starts)} fixed rows per validation"]
        if len(self.val_starts) < self.batch_size:
            lines.append("val: fewer validation rows than one batch; validation numbers will be noisy")
        return lines

    fixed_rows = True  # every row has row_tokens tokens

    @property
    def row_tokens(self) -> int:
        return self.seq_len

    @property
    def n_rows(self) -> int:
        return len(self.plan)

    def epoch_at(self, rows_done: int) -> float:
        return rows_done / len(self.plan)

    def _rows(self, split: str, starts: np.ndarray) -> torch.Tensor:
        L = self.seq_len + 1
        tokens = self.train_tokens if split == "train" else self.val_tokens
        rows = np.stack([np.asarray(tokens[s:s + L], dtype=np.int64) for s in starts])
        self.shards.check_ids(split, rows, starts)  # cheap per batch; a full scan at open would cost minutes
        return torch.from_numpy(rows)

    def batch(self, first_row: int, count: int) -> Batch:
        rows = self._rows("train", self.plan.starts[self.order.rows(first_row, count)])
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), n_tokens=count * self.seq_len)

    val_groups = ()  # one validation set, no breakdown

    def val_batches(self, rank: int, world: int):
        starts = self.val_starts
        n_batches = (len(starts) + self.batch_size - 1) // self.batch_size
        for b in range(rank, n_batches, world):
            rows = self._rows("val", starts[b * self.batch_size:(b + 1) * self.batch_size])
            targets = rows[:, 1:].contiguous()
            yield Batch(rows[:, :-1].contiguous(), targets, n_tokens=targets.numel(),
                        n_bytes=float(self.byte_lengths[targets.numpy()].sum()))


def check_lengths(recipe, rt) -> None:
    seg, seq = recipe.memory.segment_len, recipe.train.seq_len
    if recipe.model.arch != "vanilla" and seq < 2 * seg:
        warn(rt, f"train.seq_len = {seq} spans fewer than two memory segments (memory.segment_len = {seg}): the "
                 f"memory is never read after a write within a row; use train.seq_len >= {2 * seg}")
    if recipe.attention.window == 0 and seq > recipe.model.max_seq_len:
        raise Lm2Error(f"train.seq_len = {seq} exceeds model.max_seq_len = {recipe.model.max_seq_len} with full "
                       f"attention (attention.window = 0); lower train.seq_len or set a window")


def pretrain_command(recipe, recipe_path: Path | None = None, resume: bool = False,
                     resume_from: Path | None = None, dry_run: bool = False, verify_checksums: bool = True) -> None:
    with distributed_run(recipe.train) as rt:
        _pretrain(recipe, rt, recipe_path, resume, resume_from, dry_run, verify_checksums)


def _pretrain(recipe, rt, recipe_path, resume, resume_from, dry_run, verify_checksums=True) -> None:
    from lm2cli.data.shards import TokenShards
    from lm2cli.model import build_model
    from lm2cli.resources import check_training_fits

    info(rt, rt.reason)
    plan = plan_run(recipe, "pretrain", resume, resume_from, rt, dry_run, verify_checksums)
    shards = TokenShards.for_recipe(recipe)
    tokenizer = shards.tokenizer()
    recipe = with_vocab(recipe, tokenizer.vocab_size)
    check_lengths(recipe, rt)
    check_training_fits(recipe, tokenizer.vocab_size, rt)
    data = PretrainData(shards, recipe, tokenizer, rt.world)
    for line in data.describe():
        info(rt, line)
    set_determinism(recipe.train.deterministic, rt.device)
    torch.manual_seed(recipe.train.seed)  # identical initial weights on every rank and every run
    model = build_model(recipe, tokenizer.vocab_size)
    s = open_session("pretrain", recipe, rt, tokenizer, model, plan,
                     extra_state={"data_fingerprint": shards.meta.get("fingerprint")})
    stage = Stage(index=0, start_step=0, steps=recipe.train.steps)
    if dry_run:
        dry_run_report(s, data, stage)
        return
    run_stages(s, plan, [stage], lambda stage: data)
