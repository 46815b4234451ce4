"""The BABILong label-set metric: compat mode is upstream's algorithm with every quirk, strict mode fixes each;
exact match; Wilson intervals."""

from __future__ import annotations

import random

import pytest

from lm2cli.evaluation.metrics import TASK_LABELS, compare_answers, exact_match, score_answer, wilson_interval


def upstream_compare_answers(target, output, question, task_labels):
    """Upstream's algorithm as babilong.md §5.2 describes it, written out step by step for comparison."""
    output = output.lower()
    output = output.split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    output = output.split("Question")[0]
    target = target.lower()
    task_labels = {label.lower() for label in task_labels}
    labels_in_question = {label for label in task_labels if label in question.lower()}
    labels_in_output = {label for label in task_labels if label in output}
    labels_in_output = labels_in_output - labels_in_question
    if "," in target and len(target) > 3:
        subtargets = target.split(",")
        return all(t in labels_in_output for t in subtargets) and len(labels_in_output) == len(subtargets)
    return target in labels_in_output and len(labels_in_output) == 1


# (task, target, output, question, compat, strict, what it shows)
CASES = [
    ("qa1", "kitchen", "kitchen", "Where is Mary?", True, True, "plain answer"),
    ("qa1", "kitchen", "The most recent location of Mary is kitchen.", "Where is Mary?", True, True, "sentence"),
    ("qa1", "kitchen", "Kitchen", "Where is Mary?", True, True, "case-insensitive"),
    ("qa1", "kitchen", "kitchen or garden", "Where is Mary?", False, False, "two labels: wrong"),
    ("qa1", "garden", "The garden. Later the kitchen.", "Where is Mary?", True, True, "first sentence only"),
    # qa7 "none" contains "one": upstream can never score it
    ("qa7", "none", "none", "How many objects is Mary carrying?", False, True, "qa7 none quirk"),
    ("qa7", "one", "one", "How many objects is Mary carrying?", True, True, "qa7 one"),
    # the dead Question cut: after lower-casing, "Question" never matches
    ("qa1", "garden", "garden\nQuestion: where is John? kitchen", "Where is Mary?", False, True, "dead cut"),
    # "no" inside other words
    ("qa6", "yes", "yes, I do not think otherwise", "Is Mary in the garden?", False, True, "no in not"),
    ("qa6", "yes", "yes as far as I know", "Is Mary in the garden?", False, True, "no in know"),
    ("qa6", "no", "no", "Is Mary in the garden?", True, True, "plain no"),
    ("qa10", "no", "no, she went north", "Is Mary in the garden?", True, True, "no twice, one label"),
    ("qa10", "maybe", "maybe, it cannot be known", "Is Mary in the garden?", False, True, "no in cannot"),
    ("qa9", "no", "no, she has blue eyes", "Is Mary in the garden?", False, True, "yes in eyes"),
    # labels echoed from the question are ignored (in both modes)
    ("qa3", "garden", "garden, before the kitchen", "Where was the apple before the kitchen?", True, True, "echo"),
    # the first-sentence cut at any period (abbreviations)
    ("qa5", "Bill", "Mr. Bill", "Who gave the apple?", False, True, "abbreviation"),
    ("qa1", "office", "the office.", "Where is Mary?", True, True, "final period"),
    # qa8 lists: order does not matter, all parts and nothing else
    ("qa8", "apple,milk", "milk,apple", "What is Mary carrying?", True, True, "qa8 any order"),
    ("qa8", "apple,milk", "apple, milk and football", "What is Mary carrying?", False, False, "qa8 extra"),
    ("qa8", "apple,milk", "apple", "What is Mary carrying?", False, False, "qa8 missing"),
    ("qa8", "nothing", "nothing", "What is Mary carrying?", True, True, "qa8 nothing"),
    # echoed prompt parts are cut off
    ("qa1", "garden", "garden <example> kitchen", "Where is Mary?", True, True, "example cut"),
    ("qa1", "garden", "garden <context> kitchen", "Where is Mary?", True, True, "context cut"),
]


@pytest.mark.parametrize("task,target,output,question,compat,strict,why", CASES, ids=[c[-1] for c in CASES])
def test_label_metric_cases(task, target, output, question, compat, strict, why):
    labels = TASK_LABELS[task]
    assert compare_answers(target, output, question, labels) is compat
    assert upstream_compare_answers(target, output, question, labels) is compat  # the table itself is upstream's
    assert compare_answers(target, output, question, labels, strict=True) is strict


def test_qa19_direction_pairs():
    labels = TASK_LABELS["qa19"]
    question = "How do you go from the kitchen to the garden?"
    assert compare_answers("n,w", "n,w", question, labels)
    assert compare_answers("n,w", "n,w", question, labels, strict=True)
    assert not compare_answers("n,w", "s,e", question, labels, strict=True)
    # strict: a pair inside a longer comma-joined run is not that pair
    assert labels_found_strict("e,n,w", labels) == set()


def labels_found_strict(text, labels):
    from lm2cli.evaluation.metrics import labels_in

    return labels_in(text, labels, strict=True)


def test_compat_equals_upstream_on_random_outputs():
    """compat mode is upstream's algorithm, not a look-alike: agree on thousands of random outputs built from
    label words, their collisions, periods and prompt echoes."""
    rng = random.Random(0)
    pieces = ["no", "not", "none", "one", "yes", "eyes", "maybe", "kitchen", "garden", "apple", "milk", "nothing",
              "football", "Bill", "two", "n,w", "e,e", ".", ",", "Question:", "question", "<example>", "<context>",
              "Mr.", "know", "north", "the", "is", "in"]
    for task, labels in TASK_LABELS.items():
        for _ in range(300):
            target = rng.choice(labels) if task != "qa8" or rng.random() < 0.5 else "apple,milk"
            output = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 7)))
            question = rng.choice(["Where is Mary?", "Is Mary in the kitchen?", "What is Bill carrying?"])
            assert compare_answers(target, output, question, labels) == \
                upstream_compare_answers(target, output, question, labels), (task, target, output, question)


def test_exact_match_and_modes():
    assert exact_match("kitchen", " kitchen ")
    assert not exact_match("kitchen", "the kitchen")
    assert not exact_match("apple,milk", "milk,apple")  # fine-tuned protocol: order-sensitive
    assert score_answer("finetune-em", "qa1", "kitchen", "kitchen", "Where is Mary?")
    assert not score_answer("prompt-compat", "qa7", "none", "none", "How many?")
    assert score_answer("prompt-strict", "qa7", "none", "none", "How many?")


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(40.383, abs=1e-3) and hi == pytest.approx(59.617, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(27.753, abs=1e-3)
    assert wilson_interval(10, 10)[1] == 100.0 and wilson_interval(10, 10)[0] == pytest.approx(72.247, abs=1e-3)
    lo, hi = wilson_interval(87, 100)
    assert lo < 87 < hi and hi - lo < 15
