"""Does a checkpoint's block input at a fact's place word carry whose move it was? A linear probe per block.

    python recipes/babilong/probe_subject.py RUN [RUN ...] --train ROWS.json --test ROWS.json [--at question]

The delta-rule bank (memory.write = "delta") writes each token's value under that token's own key, computed from
its block's input. For qa1 ("Mary journeyed to the office.") to be answerable from the bank, the place token's
input must already hold the person: otherwise "office" is stored under a key that does not say "Mary". This
script fits, for every block input (norm1 of the residual stream, what the memory reads), a multinomial logistic
regression person <- features on the facts of the --train rows and reports its accuracy on the --test rows
(`--at question`: the asked person, at the answer separator, where the bank is read). docs/results.md (eleventh
pass) found the person at 100 % in the two trained bases whose single-block LM2 learned to bind, and at 33-88 %
in the four whose LM2 did not. Rows: a BABILong file of `lm2 babilong` (qaN/<length>.json, with fact spans);
use training-side rows for both, never test stories.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lm2cli.errors import Lm2Error

PROBE_STEPS, PROBE_LR, L2 = 300, 0.05, 1e-3


def read_rows(path: Path) -> list[dict]:
    """The rows of a BABILong file, each with the input, question and fact spans the probe needs."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Lm2Error(f"{path}: cannot read a BABILong rows file ({type(e).__name__}: {e})") from None
    if not isinstance(rows, list) or not rows:
        raise Lm2Error(f"{path}: expected a non-empty JSON list of rows, as `lm2 babilong` writes (qaN/<len>.json)")
    for i, row in enumerate(rows):
        spans = row.get("fact_spans") if isinstance(row, dict) else None
        if (not isinstance(row, dict) or not isinstance(row.get("input"), str)
                or not isinstance(row.get("question"), str) or not isinstance(spans, list)
                or not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s)
                           and 0 <= s[0] < s[1] <= len(row["input"]) for s in spans)):
            raise Lm2Error(f"{path}: row {i} lacks a string input / question or valid fact_spans ([start, end] "
                           f"character offsets into input); rebuild the set with `lm2 babilong`")
    return rows


def probe_items(rows: list[dict], tokenizer, at: str) -> list[tuple[list[int], int, str]]:
    """(token ids as the model reads them, position probed, person) per fact (at = "place") or per question
    (at = "question"). Facts whose prefix tokenises differently from the full text are skipped."""
    items = []
    for row in rows:
        text = row["input"].strip()
        if at == "question":
            if not row["question"].split():
                continue  # nothing asked: no person to probe
            ids = [tokenizer.bos_id] + tokenizer.encode(text + " " + row["question"].strip()) + [tokenizer.answer_id]
            items.append((ids, len(ids) - 1, row["question"].split()[-1].rstrip("?")))
            continue
        ids = [tokenizer.bos_id] + tokenizer.encode(text)
        for start, end in row["fact_spans"]:
            sentence = row["input"][start:end]
            prefix = [tokenizer.bos_id] + tokenizer.encode(row["input"][:end].strip().rstrip("."))
            if ids[:len(prefix)] == prefix and sentence.split():
                items.append((ids, len(prefix) - 1, sentence.split()[0]))
    return items


@torch.no_grad()
def block_inputs(model, items: list[tuple[list[int], int, str]]) -> list[torch.Tensor]:
    """Per block, the memory's view norm1(h) at every item's position, in item order: (n_items, d_model) each.
    One forward per row: a row's items are consecutive (probe_items)."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_pre_hook(lambda mod, args, k=k: seen.__setitem__(k, mod.norm1(args[0])))
             for k, block in enumerate(model.blocks)]
    per_block: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    last = None
    try:
        for ids, pos, _ in items:
            if ids != last:  # identical token rows give identical features
                model(torch.tensor([ids]))
                last = ids
            for k, features in enumerate(per_block):
                features.append(seen[k][0, pos].float())
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.stack(features) for features in per_block]


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   classes: int, seed: int = 0) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(seed)
    weight = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=PROBE_LR)
    with torch.enable_grad():
        for _ in range(PROBE_STEPS):
            loss = F.cross_entropy(x_train @ weight + bias, y_train) + L2 * weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ((x_test @ weight + bias).argmax(-1) == y_test).float().mean().item()


def probe_run(run: str, train_rows: list[dict], test_rows: list[dict], at: str, which: str) -> dict:
    from lm2cli.checkpoint import load_for_inference

    model, tokenizer, _ = load_for_inference(run, which=which)
    train, test = probe_items(train_rows, tokenizer, at), probe_items(test_rows, tokenizer, at)
    people = sorted({person for _, _, person in train})
    test = [item for item in test if item[2] in people]
    if len(people) < 2 or not test:
        raise Lm2Error(f"{run}: the rows give {len(people)} people to tell apart and {len(test)} test items; "
                       f"use qa1-style rows with several people")
    y_train = torch.tensor([people.index(person) for _, _, person in train])
    y_test = torch.tensor([people.index(person) for _, _, person in test])
    x_train, x_test = block_inputs(model, train), block_inputs(model, test)
    majority = max((y_test == c).float().mean().item() for c in range(len(people)))
    accuracy = [probe_accuracy(a, y_train, b, y_test, len(people)) for a, b in zip(x_train, x_test, strict=True)]
    return {"run": run, "at": at, "train_items": len(y_train), "test_items": len(y_test), "majority": majority,
            "accuracy_by_block_input": accuracy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run or checkpoint directories")
    parser.add_argument("--train", required=True, type=Path, help="BABILong rows to fit the probe on")
    parser.add_argument("--test", required=True, type=Path, help="BABILong rows to test it on")
    parser.add_argument("--at", choices=["place", "question"], default="place",
                        help="place: the fact's person at its place word; question: the asked person at the answer "
                             "separator")
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="latest")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        train_rows, test_rows = read_rows(args.train), read_rows(args.test)
        results = []
        for run in args.runs:
            r = probe_run(run, train_rows, test_rows, args.at, args.checkpoint)
            results.append(r)
            print(f"{run}: person at the {args.at}, {r['test_items']} test items (majority {r['majority']:.3f}); "
                  "by block input " + " ".join(f"{k}: {a:.3f}" for k, a in enumerate(r["accuracy_by_block_input"])),
                  flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    except Lm2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
