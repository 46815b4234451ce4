"""BABILong: the task x length accuracy grid (babilong.md §4-§5).

    plan = plan_babilong(settings, recipe_hint)     every row loaded and checked before any model runs
    cells = evaluate_babilong(model, runner, plan)   one Cell per (task, length), with its predictions

Modes (eval.mode):
  finetune-em    context + question + answer separator, assembled exactly as fine-tuning assembles it
                 (babilong_example); greedy until EOS; exact match.
  prompt-compat  a BABILong-style prompt written by lm2 (instruction, worked examples, answer format, the
                 context in <context> tags, the question); greedy, upstream's label-set metric with its quirks.
  prompt-strict  the same prompt, the label-set metric with the quirks fixed (lm2cli/evaluation/metrics.py).

Each model sees exactly the same rows: the first `eval.samples` of each file. With eval.retrieval = "bm25" each
model is evaluated a second time on the retrieved sentences only, reported as its own row. With eval.no_carry each
model with a memory (lm2, rmt) is evaluated once more with nothing carried from one segment to the next (every
segment reads the initial memory): row "<model>+no-carry", what the model answers without its memory's carry.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from lm2cli.data.babilong import ROW_KEYS, support_is_last_fact
from lm2cli.data.examples import babilong_example
from lm2cli.errors import Lm2Error
from lm2cli.evaluation.metrics import accuracy_counts, score_answer, wilson_interval

DEFAULT_MAX_NEW_TOKENS = {"finetune-em": 10, "prompt-compat": 20, "prompt-strict": 20}  # upstream's values

# --------------------------------------------------------------------------------------- the prompt (ours)

COMMON_INSTRUCTION = ("Below, a few short facts are hidden among unrelated sentences, followed by a question. "
                      "Answer the question from those facts only.")
CARRYING = (" People pick up, carry and put down objects: an object someone carries is wherever that person "
            "is, and an object that was put down stays where it was left.")
TASK_INSTRUCTION = {
    "qa1": " People move between places; when someone has been in several places, the answer is the last one.",
    "qa2": CARRYING,
    "qa3": CARRYING + " The question asks where an object was just before it arrived in a given place.",
    "qa4": " The facts say how places lie next to each other: north, south, east or west.",
    "qa5": " The facts say who handed which object to whom.",
    "qa6": " The question asks whether a person is in a given place now.",
    "qa7": " The question asks how many objects a person is holding now.",
    "qa8": " The question asks which objects a person is holding now.",
    "qa9": " Some facts say that a person is no longer in a place.",
    "qa10": " Some facts only say that a person is in one of two places; then the answer may be uncertain.",
}
ANSWER_FORMAT = {
    "qa1": 'Reply with one sentence of the form "The most recent location of <person> is <location>." and '
           "nothing else.",
    "qa2": 'Reply with one sentence of the form "The <object> is in <location>." and nothing else.',
    "qa3": 'Reply with one sentence of the form "Before the <location 1> the <object> was in the <location 2>." '
           "and nothing else.",
    "qa4": "Reply with a single word.",
    "qa5": "Reply with a single word.",
    "qa6": "Reply with yes or no.",
    "qa7": 'Reply with "none" or a number written as a word (one, two, three).',
    "qa8": 'Reply with "nothing" or with the objects separated by commas, such as apple,milk.',
    "qa9": "Reply with yes or no.",
    "qa10": "Reply with yes, no or maybe.",
}
EXAMPLES = {  # (context, question, answer), written for lm2
    "qa1": [("Sandra went to the office. Daniel travelled to the garden. Sandra moved to the bedroom.",
             "Where is Sandra?", "The most recent location of Sandra is bedroom."),
            ("John journeyed to the kitchen. Mary went back to the hallway.", "Where is John?",
             "The most recent location of John is kitchen.")],
    "qa2": [("Mary took the milk there. Mary went to the garden. John travelled to the office.",
             "Where is the milk?", "The milk is in garden."),
            ("Daniel picked up the apple. Daniel moved to the kitchen. Daniel dropped the apple. Daniel went to "
             "the bedroom.", "Where is the apple?", "The apple is in kitchen.")],
    "qa3": [("John grabbed the football. John went to the hallway. John moved to the office.",
             "Where was the football before the office?", "Before the office the football was in the hallway."),
            ("Sandra went to the kitchen. Sandra took the milk. Sandra travelled to the garden.",
             "Where was the milk before the garden?", "Before the garden the milk was in the kitchen.")],
    "qa4": [("The office is west of the kitchen. The garden is north of the office.",
             "What is the office east of?", "kitchen"),
            ("The bedroom is south of the hallway.", "What is north of the bedroom?", "hallway")],
    "qa5": [("Fred picked up the apple. Fred gave the apple to Bill.", "Who received the apple?", "Bill"),
            ("Mary grabbed the football. Mary handed the football to Jeff.", "What did Mary give to Jeff?",
             "football")],
    "qa6": [("John went to the garden. John moved to the office.", "Is John in the garden?", "no"),
            ("Mary travelled to the kitchen.", "Is Mary in the kitchen?", "yes")],
    "qa7": [("Daniel took the apple. Daniel picked up the milk.", "How many objects is Daniel carrying?", "two"),
            ("Sandra took the football. Sandra dropped the football.", "How many objects is Sandra carrying?",
             "none")],
    "qa8": [("John took the milk. John grabbed the apple.", "What is John carrying?", "milk,apple"),
            ("Mary picked up the football. Mary put down the football.", "What is Mary carrying?", "nothing")],
    "qa9": [("Bill is not in the bedroom. Bill went to the office.", "Is Bill in the office?", "yes"),
            ("Fred travelled to the garden. Fred is no longer in the garden.", "Is Fred in the garden?", "no")],
    "qa10": [("Julie is either in the school or the park.", "Is Julie in the park?", "maybe"),
             ("Bill went back to the cinema.", "Is Bill in the cinema?", "yes")],
}


def prompt_text(task: str, context: str, question: str, parts: list[str]) -> str:
    """The BABILong-style prompt (babilong.md §5.1 layout, lm2's wording): instruction, worked examples and
    answer format (each optional), the context in <context> tags, the question."""
    pieces = []
    if "instruction" in parts:
        pieces.append(COMMON_INSTRUCTION + TASK_INSTRUCTION[task])
    if "examples" in parts:
        pieces.append("\n".join(f"<example>\n{c}\nQuestion: {q}\nAnswer: {a}\n</example>"
                                for c, q, a in EXAMPLES[task]))
    if "post_prompt" in parts:
        pieces.append(ANSWER_FORMAT[task])
    pieces.append(f"<context>\n{context.strip()}\n</context>")
    pieces.append(f"Question: {question.strip()}")
    return "\n\n".join(pieces).strip()


def prompt_name(parts: list[str]) -> str:
    """Upstream's result naming of which prompt parts were on."""
    return "_".join(f"{p}_{'yes' if p in parts else 'no'}" for p in ("instruction", "examples", "post_prompt")) \
        + "_chat_template_no"


def prompt_ids(tokenizer, task: str, row: dict, mode: str, parts: list[str]) -> list[int]:
    if mode == "finetune-em":  # exactly the fine-tuning assembly
        return babilong_example(tokenizer, row).prompt
    return [tokenizer.bos_id] + tokenizer.encode(prompt_text(task, row["input"], row["question"], parts))


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class BabilongPlan:
    mode: str
    tasks: list[str]
    lengths: list[str]
    samples: int
    max_new_tokens: int
    prompt_parts: list[str]
    retrieval: str
    retrieval_k: int
    no_carry: bool = False
    rows: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # source description for results.json

    def variants(self, has_memory: bool) -> list[str]:
        """"" (the plain context), with retrieval the retrieved one, and with no_carry (a model with memory) the
        plain context with nothing carried across segments."""
        return ([""] + ([self.retrieval] if self.retrieval else [])
                + ([NO_CARRY] if self.no_carry and has_memory else []))

    def describe(self) -> dict:
        return {"mode": self.mode, "metric": {"finetune-em": "exact match",
                                               "prompt-compat": "BABILong label-set metric, upstream quirks kept",
                                               "prompt-strict": "BABILong label-set metric, quirks fixed"}[self.mode],
                "prompt": prompt_name(self.prompt_parts) if self.mode != "finetune-em" else "fine-tune assembly",
                "tasks": self.tasks, "lengths": self.lengths, "samples_requested": self.samples,
                "max_new_tokens": self.max_new_tokens, "decoding": "greedy",
                "retrieval": ({"method": self.retrieval, "k": self.retrieval_k} if self.retrieval else None),
                "no_carry": self.no_carry, "data": self.data}


def babilong_command_hint(data: str, tasks: list[str], lengths: list[str], recipe_hint: str) -> str:
    return (f"`lm2 babilong {recipe_hint} --out {data} --set 'babilong.tasks={json.dumps(tasks)}' "
            f"--set 'babilong.lengths={json.dumps(lengths)}'`")


def plan_babilong(cfg, recipe_hint: str) -> BabilongPlan:
    """Read every (task, length) the settings ask for, keeping the first `samples` rows; any missing file, task
    or length is reported before a model runs."""
    from lm2cli.data.babilong import HUB_ALIASES, load_babilong

    if not cfg.tasks or not cfg.lengths:
        raise Lm2Error("eval.tasks and eval.lengths must not be empty when eval.run includes babilong")
    if cfg.retrieval:
        from lm2cli.evaluation.retrieval import require_bm25

        require_bm25()
    plan = BabilongPlan(cfg.mode, list(cfg.tasks), list(cfg.lengths), cfg.samples,
                        cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[cfg.mode], list(cfg.prompt_parts),
                        cfg.retrieval, cfg.retrieval_k, cfg.no_carry)
    source = cfg.data
    root = Path(source)
    hint = babilong_command_hint(source, plan.tasks, plan.lengths, recipe_hint)
    if root.is_dir():
        check_local_files(root, plan.tasks, plan.lengths, hint)
    elif not looks_like_hub_name(source):
        raise Lm2Error(f"eval.data = {source}: no such BABILong directory; build it with {hint}")
    for task in plan.tasks:
        for length in plan.lengths:
            try:
                rows = load_babilong(source, length, task, keep_extra=True)[:plan.samples]
            except Lm2Error as e:
                if root.is_dir():
                    raise
                raise Lm2Error(f"eval.data = {source} is not a local directory, and as a hub dataset: {e}; to "
                               f"build a local set instead: {hint}") from None
            if not rows:
                raise Lm2Error(f"eval.data = {source}: {task} at {length} has no rows")
            plan.rows[(task, length)] = [_eval_row(r) for r in rows]
    plan.data = describe_source(root, HUB_ALIASES.get(source, source), plan.rows)
    return plan


def _eval_row(row: dict) -> dict:
    """The text fields, plus where the supporting fact lies when the row says (see support_is_last_fact)."""
    out = {k: row[k] for k in ROW_KEYS}
    support_last = support_is_last_fact(row)
    if support_last is not None:
        out["support_last"] = support_last
    return out


def looks_like_hub_name(source: str) -> bool:
    """owner/name whose owner is not a local directory (data/babilong with a data/ folder is a missing local
    set, not a hub dataset)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return False
    return not Path(source.split("/")[0]).is_dir() or source.split("/")[0] in ("RMT-team", "booydar")


def check_local_files(root: Path, tasks: list[str], lengths: list[str], hint: str) -> None:
    def present(task: str, length: str) -> bool:
        return any((d / task / f"{length}.json").is_file() for d in (root, root / "data"))

    missing = [f"{t}/{n}" for t in tasks for n in lengths if not present(t, n)]
    if not missing:
        return
    # names from a stranger's directory: escaped when not printable ASCII; any qa* folder name sorts
    have = sorted({f"{p.parent.name}/{p.stem}" for d in (root, root / "data") for p in d.glob("qa*/*.json")},
                  key=lambda s: (len(s.split("/")[0]), s.split("/")[0], len(s), s))
    have = [n if n.isascii() and n.isprintable() else ascii(n) for n in have]
    has = f"it has {', '.join(have[:12])}{' ...' if len(have) > 12 else ''}" if have else "it holds no qaN/*.json"
    raise Lm2Error(f"eval.data = {root}: no {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} ({has}); "
                   f"build it with {hint}, or evaluate only what is there (eval.tasks, eval.lengths)")


def describe_source(root: Path, name: str, rows: dict) -> dict:
    """Where the rows came from, with fingerprints: the builder's (lm2 sets) and one of the rows evaluated."""
    # the text fields only: the same rows keep the same digest whatever is derived from them (support_last)
    texts = {key: [{k: row[k] for k in ROW_KEYS} for row in r] for key, r in rows.items()}
    digest = hashlib.sha256(json.dumps(sorted((f"{t}/{n}", r) for (t, n), r in texts.items()),
                                       ensure_ascii=False).encode()).hexdigest()
    if not root.is_dir():
        return {"kind": "hub", "name": name, "rows_sha256": digest,
                "note": "Hugging Face hub dataset (the official BABILong release for RMT-team/*)"}
    out = {"kind": "local copy", "path": str(root), "rows_sha256": digest}
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    if meta.get("format") == "babilong":
        out.update(kind="lm2-generated", fingerprint=meta.get("fingerprint"), split=meta.get("split"),
                   tokenizer=meta.get("tokenizer"), facts_source=meta.get("facts_source"),
                   note="BABILong-style data generated by lm2 (not the official BABILong release); lengths in "
                        "tokens of the tokenizer named")
    return out


# ------------------------------------------------------------------------------------------- evaluation


@dataclass
class Cell:
    model: str
    task: str
    length: str
    n: int
    correct: int
    seconds: float
    predictions: list[dict]

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.n

    def summary(self) -> dict:
        out = {"model": self.model, "task": self.task, "length": self.length, **accuracy_counts(self.correct, self.n),
               "samples_per_s": round(self.n / self.seconds, 3) if self.seconds > 0 else None}
        split = self.by_support()
        if split:
            out["by_support"] = split
        return out

    def by_support(self) -> dict:
        """Accuracy where the newest supporting fact is the story's last fact ("last") and where other facts
        follow it ("earlier"), over the rows that say; {} when none does."""
        out = {}
        for key, value in (("last", True), ("earlier", False)):
            group = [p["correct"] for p in self.predictions if p.get("support_last") is value]
            if group:
                out[key] = accuracy_counts(sum(group), len(group))
        return out


NO_CARRY = "no-carry"  # the variant whose memory carries nothing across segments (eval.no_carry)


def variant_name(model_name: str, variant: str, k: int) -> str:
    if variant == NO_CARRY:
        return f"{model_name}+{NO_CARRY}"
    return f"{model_name}+{variant}-top{k}" if variant else model_name


@contextmanager
def carry_off(model):
    """The model with its memory carrying nothing across segments, for the duration (then as trained)."""
    model.set_memory_carry(False)
    try:
        yield model
    finally:
        model.set_memory_carry(True)


def evaluate_cell(runner, tokenizer, plan: BabilongPlan, task: str, length: str, name: str, variant: str = "",
                  check_length=None, on_done=None) -> Cell:
    """Decode every row of one (task, length) and score the answers."""
    rows = plan.rows[(task, length)]
    if variant and variant == plan.retrieval:
        from lm2cli.evaluation.retrieval import retrieved_row

        rows = [retrieved_row(r, plan.retrieval_k) for r in rows]
    prompts = [prompt_ids(tokenizer, task, r, plan.mode, plan.prompt_parts) for r in rows]
    if check_length is not None:
        check_length(max(len(p) for p in prompts) + plan.max_new_tokens, f"{task} at {length}")
    t0 = time.perf_counter()
    with carry_off(runner.model) if variant == NO_CARRY else nullcontext():
        outputs = runner.greedy(prompts, plan.max_new_tokens, tokenizer.eos_id, on_done=on_done)
    seconds = time.perf_counter() - t0
    predictions = []
    for i, (row, ids) in enumerate(zip(rows, outputs, strict=True)):
        text = tokenizer.decode(ids).strip()
        ok = score_answer(plan.mode, task, row["target"], text, row["question"])
        predictions.append({"model": name, "task": task, "length": length, "index": i, "question": row["question"],
                            "target": row["target"], "output": text, "correct": ok})
        if "support_last" in row:
            predictions[-1]["support_last"] = row["support_last"]
    return Cell(name, task, length, len(rows), sum(p["correct"] for p in predictions), seconds, predictions)


def averages(cells: list[dict], tasks: list[str], lengths: list[str]) -> list[dict]:
    """The qa1-qa5 (leaderboard) and qa1-qa10 (LM2 paper) average rows, per model and length, where every task
    of the range was evaluated: the mean of the task accuracies, with a Wilson interval on the pooled counts."""
    out = []
    by_key = {(c["model"], c["task"], c["length"]): c for c in cells}
    models = list(dict.fromkeys(c["model"] for c in cells))
    for label, count in (("qa1-qa5", 5), ("qa1-qa10", 10)):
        wanted = [f"qa{i}" for i in range(1, count + 1)]
        if not set(wanted) <= set(tasks):
            continue
        for model in models:
            for length in lengths:
                group = [by_key.get((model, t, length)) for t in wanted]
                if any(c is None for c in group):
                    continue
                n, correct = sum(c["n"] for c in group), sum(c["correct"] for c in group)
                lo, hi = wilson_interval(correct, n)
                out.append({"model": model, "task": label, "length": length, "n": n, "correct": correct,
                            "accuracy": round(sum(c["accuracy"] for c in group) / len(group), 4),
                            "ci95": [round(lo, 4), round(hi, 4)]})
    return out
