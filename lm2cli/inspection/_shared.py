"""The one place where inspection reaches for what issue 10 will move or unify (see the comment below)."""

from __future__ import annotations

from pathlib import Path

# issue 10 will provide these: `lm2cli.checkpoint` becomes the single resolver of RUN_OR_CHECKPOINT_OR_RECIPE
# (a .toml path means that recipe's output.dir run; no argument means the newest run of the default recipe),
# `babilong_example` moves from training/finetune.py to lm2cli/data/examples.py, and data/generator.py is
# renamed. When it lands: replace `resolve_checkpoint` with the shared resolver, build `babilong_prompt`'s
# ids with `babilong_example`, and point `babi_vocabulary` at the renamed module; nothing else in
# lm2cli/inspection needs to change. Inspection never imports lm2cli.training.
from lm2cli.checkpoint import load_for_inference

__all__ = ["resolve_checkpoint", "load_for_inference", "babilong_context", "babilong_prompt", "babi_vocabulary"]


def resolve_checkpoint(target: Path | None) -> Path:
    """The checkpoint that RUN_OR_CHECKPOINT_OR_RECIPE names (issue 10: the shared resolver replaces this)."""
    from lm2cli.checkpoint import resolve_target

    return resolve_target(target).checkpoint


def babilong_context(row: dict) -> str:
    """The text a BABILong row is read as, before the answer separator (babilong.md §5.3). A character span
    of `row["input"]` moves left by the input's leading whitespace in it."""
    return row["input"].strip() + " " + row["question"].strip()


def babilong_prompt(tokenizer, row: dict) -> tuple[list[int], list[tuple[int, int] | None]]:
    """[BOS] + context + [answer separator], as fine-tuning and eval assemble it (issue 10: take the ids from
    `lm2cli.data.examples.babilong_example`), with each token's character span in `babilong_context(row)`
    (None for BOS and the separator, which stand for no text)."""
    ids, spans = tokenizer.encode_with_offsets(babilong_context(row))
    return [tokenizer.bos_id, *ids, tokenizer.answer_id], [None, *spans, None]


def babi_vocabulary() -> tuple[set[str], set[str]]:
    """(names, nouns) of bAbI statements, from the story generator (issue 10 renames its module)."""
    from lm2cli.data.stories import ACTORS, ACTORS_QA5, ACTORS_QA10, OBJECTS, PLACES, ROOMS

    return set(ACTORS + ACTORS_QA5 + ACTORS_QA10), set(ROOMS + PLACES + OBJECTS)
