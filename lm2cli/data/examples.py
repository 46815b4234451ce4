"""Rows assembled into token sequences, the same way for fine-tuning and `lm2 eval`.

    babilong  BOS + encode(input.strip() + " " + question.strip()) + ANSWER | encode(target.strip()) + EOS
              (babilong.md §5.3)
    jsonl     {"prompt", "response"} per line: BOS + encode(prompt) | encode(response) + EOS

An `Example` keeps the two parts apart: `prompt` (no loss; what a model is given) and `answer` (what it is
trained and scored on).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from lm2cli.errors import Lm2Error
from lm2cli.recipe import BABILONG_LENGTHS


@dataclass
class Example:
    prompt: list[int]  # tokens that get no loss, BOS (and the answer separator) included
    answer: list[int]  # tokens that get loss, EOS included
    text_answer: str = ""
    # The row it was assembled from, with every key of the file (fact_spans, support, ...), when loaded with
    # keep_extra: the fact curriculum (lm2cli.training.curriculum) cuts rows by their facts.
    row: dict | None = field(default=None, compare=False, repr=False)
    # What a validation reports it under, besides the total: a BABILong row's length ("0k", "1k", ...), so a
    # fine-tune whose validation mixes lengths shows how each one goes. "" = no group.
    group: str = field(default="", compare=False)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer)


def babilong_context(row: dict) -> str:
    """The text a BABILong row is read as, before the answer separator: `input.strip() + " " + question.strip()`
    (babilong.md §5.3). A character span of `row["input"]` moves left by the input's leading whitespace in it."""
    return row["input"].strip() + " " + row["question"].strip()


def babilong_example(tokenizer, row: dict) -> Example:
    """One BABILong row as babilong.md §5.3 assembles it, for fine-tuning and `lm2 eval` alike:
    BOS + encode(context) + ANSWER separator, then encode(target.strip()) + EOS (the tokens that get loss)."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(babilong_context(row)) + [tokenizer.answer_id]
    target = str(row["target"]).strip()
    return Example(prompt, tokenizer.encode(target) + [tokenizer.eos_id], target)


def jsonl_example(tokenizer, row: dict) -> Example:
    """One {"prompt", "response"} row: BOS + encode(prompt), then encode(response) + EOS."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(row["prompt"])
    return Example(prompt, tokenizer.encode(row["response"]) + [tokenizer.eos_id], row["response"])


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise Lm2Error(f"finetune data not found: {path} (format = \"jsonl\" expects a .jsonl file)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise Lm2Error(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                    or not isinstance(row.get("response"), str):
                raise Lm2Error(f"{path}:{n}: expected an object with string fields \"prompt\" and \"response\"")
            rows.append(row)
    if not rows:
        raise Lm2Error(f"{path}: no rows")
    return rows


def babilong_lengths(source: str, tasks: list[str], recipe) -> list[str]:
    """Lengths present for the tasks: the files of a local directory, else the recipe's babilong.lengths."""
    root = Path(source)
    if root.is_dir():
        files = [p for t in tasks for d in (root / t, root / "data" / t) for p in d.glob("*.json")]
        for p in files:  # the name becomes a label on the console and in metrics: only the lengths lm2 knows
            if p.stem not in BABILONG_LENGTHS:
                raise Lm2Error(f"{ascii(str(p))}: not a BABILong length file; expected one of "
                               f"{', '.join(n + '.json' for n in BABILONG_LENGTHS)} (as `lm2 babilong` writes)")
        found = sorted({p.stem for p in files}, key=lambda s: (len(s), s))
        if not found:
            raise Lm2Error(f"{root}: no BABILong files for {', '.join(tasks)} (expected {root}/qa1/0k.json ...); "
                           f"build them with `lm2 babilong RECIPE --set babilong.split=train`")
        return found
    if "/" in source and not root.exists():
        return list(recipe.babilong.lengths)  # a hub dataset name
    raise Lm2Error(f"finetune data not found: {root} (format = \"babilong\" expects a directory qaN/<length>.json "
                   f"or a hub dataset name)")


def read_babilong(source: str, tasks: list[str], recipe, keep_extra: bool = False) -> list[dict]:
    from lm2cli.data.babilong import load_babilong

    rows = []
    for task in tasks:
        for length in babilong_lengths(source, [task], recipe):
            rows.extend(dict(r, task=task, length=length) for r in load_babilong(source, length, task, keep_extra))
    if not rows:
        raise Lm2Error(f"{source}: no BABILong rows for tasks {', '.join(tasks)}")
    return rows


def load_examples(recipe, tokenizer, source: str, keep_rows: bool = False) -> list[Example]:
    """Every row of `source` assembled for the recipe's finetune.format ("jsonl" or "babilong", finetune.tasks).
    `keep_rows`: each BABILong Example keeps its row with every key of the file (`Example.row`)."""
    f = recipe.finetune
    if f.format == "jsonl":
        return [jsonl_example(tokenizer, r) for r in read_jsonl(Path(source))]
    rows = read_babilong(source, list(f.tasks), recipe, keep_extra=keep_rows)
    return [dataclasses.replace(babilong_example(tokenizer, r), group=r["length"], row=r if keep_rows else None)
            for r in rows]
