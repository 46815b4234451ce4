"""Multiple choice in the MMLU layout: a question, four choices, an answer letter.

Data (`eval.mc_data`):
  a hub name such as cais/mmlu   its "all" configuration: the test split, and the dev split for k-shot
  a directory                    the MMLU tarball layout: test/<subject>_test.csv and dev/<subject>_dev.csv
                                 (.csv, .jsonl, .json or .parquet; files directly in the directory are test rows)
  a file                         test rows; dev rows from the sibling file with "test" replaced by "dev"
Rows: csv without a header is MMLU's raw format (question, A, B, C, D, answer letter; the subject from the
file name); otherwise records with question, choices (or A-D), answer (0-3 or a letter) and optionally subject.

The prompt is the standard one (lm-evaluation-harness's MMLU template): a description naming the subject,
`eval.mc_shots` solved dev questions of the same subject, then the question and "Answer:". The letter whose
continuation (" A" ... " D") has the highest log-likelihood wins. Accuracy is reported per subject, for MMLU's
four standard groups and overall (each a mean over questions).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from lm2cli.errors import Lm2Error
from lm2cli.evaluation.metrics import accuracy_counts

LETTERS = ["A", "B", "C", "D"]
RECORD_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")

# MMLU's subject categories (the grouping lm-evaluation-harness reports as mmlu_stem, ...).
GROUPS = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
GROUP_OF = {subject: group for group, names in GROUPS.items() for subject in names.split()}


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]
    answer: int  # 0-3


# ------------------------------------------------------------------------------------------------ data


def subject_of_file(path: Path) -> str:
    stem = path.stem
    for suffix in ("_test", "_dev", "_val", "_validation"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _answer_index(value, where: str) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and 0 <= value < 4:
        return value
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, str) and value.strip() in ("0", "1", "2", "3"):
        return int(value)
    raise Lm2Error(f"{where}: answer {value!r} is not a letter A-D or an index 0-3")


def question_from_record(record: dict, default_subject: str, where: str) -> Question:
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise Lm2Error(f"{where}: expected a record with a \"question\" string, choices and an answer")
    choices = record.get("choices")
    if choices is None and all(k in record for k in LETTERS):
        choices = [record[k] for k in LETTERS]
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise Lm2Error(f"{where}: expected four text choices (\"choices\" or fields A, B, C, D)")
    subject = record.get("subject") or default_subject
    return Question(str(subject), record["question"], list(choices), _answer_index(record.get("answer"), where))


def read_file(path: Path) -> list[Question]:
    suffix = path.suffix.lower()
    default_subject = subject_of_file(path)
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            table = list(csv.reader(f))
        if table and [c.strip().lower() for c in table[0]][:1] == ["question"]:
            header = [c.strip() for c in table[0]]
            records = [dict(zip(header, row, strict=False)) for row in table[1:]]
        else:  # MMLU's raw files: question, A, B, C, D, answer
            records = []
            for n, row in enumerate(table, 1):
                if len(row) != 6:
                    raise Lm2Error(f"{path}:{n}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
                records.append({"question": row[0], "choices": row[1:5], "answer": row[5]})
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    elif suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise Lm2Error(f"{path}:{n}: invalid JSON ({e.msg})") from None
    else:
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise Lm2Error(f"{path}: invalid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise Lm2Error(f"{path}: expected a JSON list of records")
    return [question_from_record(r, default_subject, f"{path} row {i + 1}") for i, r in enumerate(records)]


def _files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in RECORD_SUFFIXES)


def load_questions(source: str) -> tuple[list[Question], list[Question], dict]:
    """(test questions, dev questions, description of the source)."""
    path = Path(source)
    if path.is_dir():
        test_dir = path / "test" if (path / "test").is_dir() else path
        test_files = _files_in(test_dir)
        if not test_files:
            raise Lm2Error(f"eval.mc_data = {source}: no .csv/.jsonl/.json/.parquet files in {test_dir}")
        dev_files = _files_in(path / "dev") if (path / "dev").is_dir() else []
        files = test_files + dev_files
        test = [q for f in test_files for q in read_file(f)]
        dev = [q for f in dev_files for q in read_file(f)]
    elif path.is_file():
        if path.suffix.lower() not in RECORD_SUFFIXES:
            raise Lm2Error(f"eval.mc_data = {source}: expected a .csv, .jsonl, .json or .parquet file")
        sibling = path.with_name(path.name.replace("test", "dev"))
        files = [path] + ([sibling] if sibling != path and sibling.is_file() else [])
        test = read_file(path)
        dev = read_file(sibling) if len(files) > 1 else []
    elif "/" in source and not path.exists() and len(source.split("/")) == 2:
        return _load_hub(source)
    else:
        raise Lm2Error(f"eval.mc_data = {source}: not found (expected a file, a directory or a hub name such as "
                       f"cais/mmlu)")
    from lm2cli.fileio import sha256_file

    return test, dev, {"kind": "local", "path": source, "sha256": {str(f): sha256_file(f) for f in files}}


def _load_hub(name: str):
    from lm2cli.data.corpus import load_hub_dataset

    data = load_hub_dataset(name, "all", key="eval.mc_data",
                            alternative="copy the data to a local directory (test/ and dev/ csv files)")
    if "test" not in data:
        raise Lm2Error(f"eval.mc_data = {name}: the hub dataset has no test split (splits: {', '.join(data)})")
    test = [question_from_record(r, "all", f"{name} test row {i + 1}") for i, r in enumerate(data["test"])]
    dev = ([question_from_record(r, "all", f"{name} dev row {i + 1}") for i, r in enumerate(data["dev"])]
           if "dev" in data else [])
    return test, dev, {"kind": "hub", "name": name, "config": "all"}


# ---------------------------------------------------------------------------------------------- prompts


def format_question(q: Question) -> str:
    lines = [q.question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def build_context(q: Question, shots: list[Question]) -> str:
    description = f"The following are multiple choice questions (with answers) about {q.subject.replace('_', ' ')}."
    solved = "".join(f"{format_question(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    return f"{description}\n\n{solved}{format_question(q)}"


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + context tokens, continuation tokens) split the way lm-evaluation-harness splits a pair: trailing
    spaces of the context move to the continuation, and the continuation is what encoding the whole text adds
    after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context) if context else []
    whole = tokenizer.encode(context + continuation)
    return [tokenizer.bos_id] + context_ids, whole[len(context_ids):]


@dataclass
class MultipleChoicePlan:
    questions: list[Question]
    shots: dict[str, list[Question]]
    k: int
    source: dict

    def describe(self) -> dict:
        subjects = sorted({q.subject for q in self.questions})
        return {**self.source, "questions": len(self.questions), "subjects": len(subjects), "shots": self.k,
                "prompt": "lm-evaluation-harness MMLU template; answer = highest log-likelihood of ' A'..' D'"}


def plan_multiple_choice(cfg) -> MultipleChoicePlan:
    test, dev, source = load_questions(cfg.mc_data)
    if cfg.mc_subjects:
        known = {q.subject for q in test}
        unknown = [s for s in cfg.mc_subjects if s not in known]
        if unknown:
            raise Lm2Error(f"eval.mc_subjects: {', '.join(unknown)} not in {cfg.mc_data} (it has "
                           f"{', '.join(sorted(known)[:8])}{' ...' if len(known) > 8 else ''})")
        test = [q for q in test if q.subject in cfg.mc_subjects]
    if cfg.mc_samples:  # the first questions of each subject
        seen: dict[str, int] = {}
        kept = []
        for q in test:
            seen[q.subject] = seen.get(q.subject, 0) + 1
            if seen[q.subject] <= cfg.mc_samples:
                kept.append(q)
        test = kept
    if not test:
        raise Lm2Error(f"eval.mc_data = {cfg.mc_data}: no questions to evaluate")
    shots: dict[str, list[Question]] = {}
    if cfg.mc_shots:
        for subject in sorted({q.subject for q in test}):
            pool = [q for q in dev if q.subject == subject]
            if len(pool) < cfg.mc_shots:
                raise Lm2Error(f"eval.mc_shots = {cfg.mc_shots}: the dev split of {cfg.mc_data} has {len(pool)} "
                               f"questions for {subject}; lower eval.mc_shots or provide dev rows")
            shots[subject] = pool[:cfg.mc_shots]  # the first k, as the harness's first_n sampler
    return MultipleChoicePlan(test, shots, cfg.mc_shots, source)


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_multiple_choice(runner, tokenizer, plan: MultipleChoicePlan, name: str, check_length=None,
                             on_done=None) -> dict:
    contexts, continuations = [], []
    for q in plan.questions:
        pairs = [encode_pair(tokenizer, build_context(q, plan.shots.get(q.subject, [])), f" {letter}")
                 for letter in LETTERS]
        contexts.append(pairs[0][0])
        continuations.append([cont for _, cont in pairs])
    if check_length is not None:
        check_length(max(len(c) + max(len(k) for k in ks) for c, ks in zip(contexts, continuations, strict=True)),
                     f"multiple choice with eval.mc_shots = {plan.k}")
    scores = runner.continuation_scores(contexts, continuations, on_done=on_done)
    picks = [max(range(4), key=lambda i, s=s: (s[i][0], -i)) for s in scores]  # ties: the first letter
    correct = [p == q.answer for p, q in zip(picks, plan.questions, strict=True)]
    return summarize(name, plan.questions, correct, picks)


def _accuracy(name: str, label: str, hits: list[bool]) -> dict:
    return {"model": name, "name": label, **accuracy_counts(sum(hits), len(hits))}


def summarize(name: str, questions: list[Question], correct: list[bool], picks: list[int]) -> dict:
    by_subject: dict[str, list[bool]] = {}
    by_group: dict[str, list[bool]] = {}
    for q, ok in zip(questions, correct, strict=True):
        by_subject.setdefault(q.subject, []).append(ok)
        if q.subject in GROUP_OF:
            by_group.setdefault(GROUP_OF[q.subject], []).append(ok)
    return {"model": name,
            "overall": _accuracy(name, "overall", correct),
            "groups": [_accuracy(name, g, by_group[g]) for g in GROUPS if g in by_group],
            "subjects": [_accuracy(name, s, hits) for s, hits in sorted(by_subject.items())],
            "predictions": [{"model": name, "subject": q.subject, "question": q.question,
                             "target": LETTERS[q.answer], "output": LETTERS[p], "correct": ok}
                            for q, p, ok in zip(questions, picks, correct, strict=True)]}
