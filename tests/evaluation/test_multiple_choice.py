"""Multiple choice (MMLU layout) on a small fixture written here."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lm2cli.errors import Lm2Error
from lm2cli.evaluation.decode import StateRunner
from lm2cli.evaluation.multiple_choice import (
    LETTERS,
    build_context,
    encode_pair,
    evaluate_multiple_choice,
    load_questions,
    plan_multiple_choice,
)
from lm2cli.recipe import load_recipe

from .conftest import tiny_model

QUESTIONS = {
    "anatomy": [("Where is the heart?", ["chest", "foot", "hand", "ear"], "A"),
                ("How many lungs do people have?", ["one", "two", "three", "four"], "B"),
                ("Which organ filters blood?", ["skin", "hair", "kidney", "nail"], "C")],
    "philosophy": [("Who wrote the Republic?", ["Hume", "Kant", "Mill", "Plato"], "D"),
                   ("What is ethics about?", ["right action", "rocks", "rain", "roads"], "A")],
}


def write_mmlu(root):
    """MMLU's raw layout: test/<subject>_test.csv and dev/<subject>_dev.csv, no header."""
    for split in ("test", "dev"):
        (root / split).mkdir(parents=True)
        for subject, rows in QUESTIONS.items():
            with open(root / split / f"{subject}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                for q, choices, answer in (rows if split == "test" else rows[::-1]):
                    w.writerow([f"{q}" if split == "test" else f"(dev) {q}", *choices, answer])
    return root


def cfg(data, *sets):
    return load_recipe(None, [f"eval.mc_data={json.dumps(str(data))}", *sets]).eval


def test_the_most_likely_letter_wins(tmp_path, tokenizer):
    plan = plan_multiple_choice(cfg(write_mmlu(tmp_path / "mmlu"), "eval.mc_shots=1"))
    assert len(plan.questions) == 5 and plan.shots["anatomy"][0].question.startswith("(dev)")
    model, recipe = tiny_model(tokenizer, "attention.window=24", seed=3)
    runner = StateRunner(model, recipe.memory.segment_len, "cpu", batch_size=2)
    result = evaluate_multiple_choice(runner, tokenizer, plan, "m")
    with torch.no_grad():
        for q, pred in zip(plan.questions, result["predictions"], strict=True):
            context = build_context(q, plan.shots[q.subject])
            assert context.count("Answer:") == 2 and "(dev)" in context
            logprobs = []
            for letter in LETTERS:
                ctx, cont = encode_pair(tokenizer, context, f" {letter}")
                logits, _ = model(torch.tensor([ctx + cont]), None)
                logp = torch.log_softmax(logits[0, len(ctx) - 1:-1], dim=-1)
                logprobs.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
            assert pred["output"] == LETTERS[max(range(4), key=lambda i: logprobs[i])]
            assert pred["correct"] == (pred["output"] == pred["target"])
    groups = {g["name"]: g for g in result["groups"]}
    assert groups["stem"]["n"] == 3 and groups["humanities"]["n"] == 2
    assert result["overall"]["correct"] == sum(p["correct"] for p in result["predictions"])
    assert [s["name"] for s in result["subjects"]] == ["anatomy", "philosophy"]


def test_records_files_subjects_and_limits(tmp_path):
    path = tmp_path / "mc_test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "q1", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "virology"},
        {"question": "q2", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "D", "subject": "virology"},
        {"question": "q3", "choices": ["a", "b", "c", "d"], "answer": 0, "subject": "sociology"}]))
    test, dev, source = load_questions(str(path))
    assert [q.answer for q in test] == [2, 3, 0] and dev == [] and source["kind"] == "local"
    plan = plan_multiple_choice(cfg(path, "eval.mc_samples=1"))
    assert [q.question for q in plan.questions] == ["q1", "q3"]
    plan = plan_multiple_choice(cfg(path, 'eval.mc_subjects=["sociology"]'))
    assert [q.question for q in plan.questions] == ["q3"]
    with pytest.raises(Lm2Error, match="dev split .* has 0 questions"):
        plan_multiple_choice(cfg(path, "eval.mc_shots=2"))
    with pytest.raises(Lm2Error, match="mc_subjects: law not in"):
        plan_multiple_choice(cfg(path, 'eval.mc_subjects=["law"]'))
    bad = tmp_path / "bad_test.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}))
    with pytest.raises(Lm2Error, match="bad_test.jsonl row 1: expected four text choices"):
        load_questions(str(bad))
