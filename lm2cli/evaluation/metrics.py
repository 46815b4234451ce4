"""Answer scoring for BABILong (babilong.md §5.2-5.3) and the 95 % confidence interval of an accuracy.

    exact_match(target, output)                      finetune-em: the stripped strings are equal
    compare_answers(target, output, question, task)  prompt-compat: upstream's label-set metric, quirks and all
    compare_answers(..., strict=True)                prompt-strict: the same pipeline with the quirks fixed
    wilson_interval(correct, n)                      95 % Wilson score interval, in percent
    accuracy_counts(correct, n)                      {n, correct, accuracy, ci95} as results files store them

The compat metric reproduces upstream's algorithm on purpose, including what it gets wrong, so that our numbers
compare with published BABILong prompt-mode results:

  * dead cut: the output is lower-cased before it is cut at "Question", so that cut never fires;
  * labels are plain substrings: "none" also contains "one" (qa7's "none" can never score), "no" is found in
    "not", "know", "nothing", "north" and "cannot", "yes" in "eyes";
  * labels mentioned in the question are ignored in the output (this only removes echoes);
  * the output is cut at its first ".", also inside abbreviations.

Strict mode matches labels on word boundaries (comma-joined labels such as qa19's "n,w" as whole tokens),
cuts at a sentence-final period (followed by whitespace or the end, not ending an abbreviation or an initial)
and applies the "Question" cut case-insensitively.
"""

from __future__ import annotations

import math
import re

_ROOMS = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]

# Closed label set per task (upstream TASK_LABELS), compared lower-cased.
TASK_LABELS: dict[str, list[str]] = {
    **{t: _ROOMS for t in ("qa1", "qa2", "qa3", "qa4", "qa11", "qa12", "qa13")},
    "qa5": ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"],
    **{t: ["no", "yes"] for t in ("qa6", "qa9", "qa17", "qa18")},
    "qa7": ["none", "one", "three", "two"],
    "qa8": ["apple", "football", "milk", "nothing"],
    "qa10": ["maybe", "no", "yes"],
    "qa14": ["bedroom", "cinema", "kitchen", "office", "park", "school"],
    "qa15": ["cat", "mouse", "sheep", "wolf"],
    "qa16": ["gray", "green", "white", "yellow"],
    "qa19": ["e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"],
    "qa20": ["bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"],
}

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile


def exact_match(target: str, output: str) -> bool:
    """finetune-em (babilong.md §5.3): the generated answer, stripped, equals the target. qa8 lists are
    order-sensitive here, as in upstream's fine-tuned protocol."""
    return output.strip() == target.strip()


def clean_output(output: str, strict: bool = False) -> str:
    """The part of an answer the label metric looks at: lower-cased, its first sentence, before any echoed
    <context>, <example> or Question."""
    output = output.lower()
    output = first_sentence(output) if strict else output.split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    # compat: upstream cuts at "Question" after lower-casing, which never matches (the dead cut)
    return output.split("question" if strict else "Question")[0]


def first_sentence(text: str) -> str:
    """`text` up to its first sentence-final period: one followed by whitespace or the end, and not ending an
    abbreviation or an initial ("Mr. Bill", "J. Smith"; the BABILong builder's sentence rule)."""
    from lm2cli.data.haystack import ABBREVIATIONS

    for m in re.finditer(r"\.(?=\s|$)", text):
        word = re.search(r"([\w.]+)$", text[:m.start()])
        if word and (word.group(1).lower() in ABBREVIATIONS or len(word.group(1)) == 1):
            continue
        return text[:m.start()]
    return text


def _mentioned(label: str, text: str, strict: bool) -> bool:
    if not strict:
        return label in text
    # whole words; a comma-joined label (qa19 "n,w") must not be part of a longer comma-joined token
    return re.search(rf"(?<![\w,]){re.escape(label)}(?![\w,])" if "," in label
                     else rf"\b{re.escape(label)}\b", text) is not None


def labels_in(text: str, labels: list[str], strict: bool = False) -> set[str]:
    return {label for label in labels if _mentioned(label, text, strict)}


def compare_answers(target: str, output: str, question: str, labels: list[str], strict: bool = False) -> bool:
    """Upstream's label-set decision (strict=False, quirks kept) or lm2's fixed version (strict=True)."""
    output = clean_output(output, strict)
    target = target.lower()
    labels = [label.lower() for label in labels]
    in_question = labels_in(question.lower(), labels, strict)
    in_output = labels_in(output, labels, strict) - in_question
    if "," in target and len(target) > 3:  # a qa8 list: every part named, nothing else, in any order
        parts = [p.strip() for p in target.split(",")] if strict else target.split(",")
        return all(p in in_output for p in parts) and len(in_output) == len(parts)
    return target in in_output and len(in_output) == 1


def score_answer(mode: str, task: str, target: str, output: str, question: str) -> bool:
    """Correctness of one answer under `eval.mode`."""
    if mode == "finetune-em":
        return exact_match(target, output)
    if task not in TASK_LABELS:
        raise ValueError(f"no label set for task {task}")
    return compare_answers(target, output, question, TASK_LABELS[task], strict=mode == "prompt-strict")


def accuracy_counts(correct: int, n: int) -> dict:
    """n, correct, accuracy % and its 95 % Wilson interval, rounded as every results file stores them."""
    lo, hi = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": round(100.0 * correct / n, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """95 % Wilson score interval of `correct` out of `n`, in percent (0-100). With 100 samples it is about
    ±10 points around 50 %, narrower near 0 and 100 %, and never leaves [0, 100]."""
    if n <= 0:
        return (0.0, 100.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends (rounding would leave 99.999...)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return (100 * lo, 100 * hi)
