"""The bAbI v1.2 text format: stories, reading and writing, the per-question split, and statistics.

    <ID> <statement>
    <ID> <question>[ ]\\t<answer>\\t<support IDs>

IDs restart at 1 for every story and count statements and questions together. Every task except qa4 puts one
space after the question mark; the reader accepts both and the writer reproduces the convention per task.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lm2cli.errors import Lm2Error

TASK_STEMS = {
    "qa1": "single-supporting-fact", "qa2": "two-supporting-facts", "qa3": "three-supporting-facts",
    "qa4": "two-arg-relations", "qa5": "three-arg-relations", "qa6": "yes-no-questions", "qa7": "counting",
    "qa8": "lists-sets", "qa9": "simple-negation", "qa10": "indefinite-knowledge",
}
_FILE_NAME = re.compile(r"^(qa\d+)_[a-z-]+_(train|test|valid)\.txt$")


@dataclass
class Line:
    """One line of a story. `support` holds 1-based IDs of statements in the same story (questions only)."""

    text: str
    answer: str | None = None
    support: list[int] = field(default_factory=list)

    @property
    def is_question(self) -> bool:
        return self.answer is not None


@dataclass
class Story:
    task: str
    lines: list[Line]

    def statements(self) -> list[str]:
        return [ln.text for ln in self.lines if not ln.is_question]


@dataclass
class Sample:
    """One question with everything before it: BABILong's unit (§1.2 of docs/data.md)."""

    task: str
    facts: list[str]
    question: str  # with the task's bAbI trailing space (none for qa4)
    answer: str
    references: list[str]
    support_positions: list[int]  # indices into `facts` of the supporting statements


def file_name(task: str, split: str) -> str:
    return f"{task}_{TASK_STEMS[task]}_{split}.txt"


def question_suffix(task: str) -> str:
    return "" if task == "qa4" else " "


# -------------------------------------------------------------------------------------------- writing


def format_story(story: Story) -> str:
    """A story in the bAbI text format (with IDs, tabs and support IDs), ending with a newline."""
    out = []
    for i, ln in enumerate(story.lines, 1):
        if ln.is_question:
            support = " ".join(str(s) for s in ln.support)
            out.append(f"{i} {ln.text}{question_suffix(story.task)}\t{ln.answer}\t{support}")
        else:
            out.append(f"{i} {ln.text}")
    return "\n".join(out) + "\n"


def render_plain(story: Story) -> str:
    """A story as pretraining text: no IDs, questions answered in place (`Where is Mary? bathroom`), all on one
    line joined by single spaces, as BABILong joins the facts of a 0k input.

    One line matters: SentencePiece gives a word its "▁" piece only after a space, so a name starting a line
    would be other tokens ('M' 'ary') than the same name inside the question ('▁Mary'), and what pretraining
    teaches about names would not carry over to the fine-tuning and evaluation rows.
    """
    return " ".join(f"{ln.text} {ln.answer}" if ln.is_question else ln.text for ln in story.lines)


def write_babi_file(path: str | Path, stories: Iterable[Story]) -> None:
    from lm2cli.fileio import atomic_write_text

    atomic_write_text(path, "".join(format_story(s) for s in stories))


# -------------------------------------------------------------------------------------------- reading


def task_of_file(path: Path) -> str | None:
    m = _FILE_NAME.match(path.name)
    return m.group(1) if m else None


def parse_babi(text: str, task: str, where: str = "bAbI text") -> list[Story]:
    """Stories of a bAbI-format text. Raises Lm2Error naming the line of any malformed record."""
    stories: list[Story] = []
    lines: list[Line] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        head, _, rest = raw.partition(" ")
        if not head.isdigit() or not rest:
            raise Lm2Error(f"{where}:{lineno}: expected '<ID> <text>', got {raw[:60]!r}")
        line_id = int(head)
        if line_id == 1 and lines:
            stories.append(Story(task, lines))
            lines = []
        if line_id != len(lines) + 1:
            raise Lm2Error(f"{where}:{lineno}: line ID {line_id} does not follow {len(lines)}")
        if "\t" in rest:
            parts = rest.split("\t")
            if len(parts) != 3:
                raise Lm2Error(f"{where}:{lineno}: a question line needs 'question<TAB>answer<TAB>support IDs'")
            question, answer, support = parts
            try:
                ids = [int(s) for s in support.split()]
            except ValueError:
                raise Lm2Error(f"{where}:{lineno}: support IDs must be integers, got {support!r}") from None
            for s in ids:
                if not 1 <= s <= len(lines) or lines[s - 1].is_question:
                    raise Lm2Error(f"{where}:{lineno}: support ID {s} is not a statement of this story")
            lines.append(Line(question.rstrip(), answer.strip(), ids))
        else:
            lines.append(Line(rest.strip()))
    if lines:
        stories.append(Story(task, lines))
    return stories


def read_babi_file(path: str | Path, task: str | None = None) -> list[Story]:
    path = Path(path)
    task = task or task_of_file(path)
    if task is None:
        raise Lm2Error(f"{path}: cannot tell the task from the file name; "
                       f"expected e.g. qa1_single-supporting-fact_train.txt")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Lm2Error(f"bAbI file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise Lm2Error(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    return parse_babi(text, task, where=str(path))


def find_babi_file(directory: str | Path, task: str, split: str) -> Path:
    """`qaN_*_{split}.txt` in a bAbI directory (e.g. tasks_1-20_v1-2/en-10k)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise Lm2Error(f"bAbI directory not found: {directory}")
    matches = sorted(directory.glob(f"{task}_*_{split}.txt"))
    if not matches:
        raise Lm2Error(f"{directory}: no {task}_*_{split}.txt file (a bAbI v1.2 directory such as en-10k/)")
    return matches[0]


# ------------------------------------------------------------------------------------------- samples


def story_samples(story: Story) -> Iterator[Sample]:
    """One sample per question: the statements so far (earlier questions removed), question, answer."""
    facts: list[str] = []
    position_of_id: dict[int, int] = {}
    for line_id, ln in enumerate(story.lines, 1):
        if ln.is_question:
            positions = [position_of_id[s] for s in ln.support]
            yield Sample(story.task, list(facts), ln.text + question_suffix(story.task), ln.answer,
                         [facts[p] for p in positions], positions)
        else:
            position_of_id[line_id] = len(facts)
            facts.append(ln.text)


def samples_of(stories: Iterable[Story]) -> Iterator[Sample]:
    for story in stories:
        yield from story_samples(story)


# ---------------------------------------------------------------------------------------- statistics

_VERB_PATTERNS = {
    "move": re.compile(r"^\w+ (moved|went back|went|journeyed|travelled) to the \w+\.$"),
    "get": re.compile(r"^\w+ (got|took|grabbed|picked up) the \w+( there)?\.$"),
    "drop": re.compile(r"^\w+ (dropped|left|discarded|put down) the \w+( there)?\.$"),
    "give": re.compile(r"^\w+ (gave|handed|passed) the \w+ to \w+\.$"),
}


def statistics(stories: list[Story]) -> dict:
    """Shares and histograms the generator is checked against (verb shares, answers, support recency...).

    Shares are fractions in [0, 1]. `recency` is how many statements back the newest supporting fact lies.
    """
    verbs: dict[str, Counter] = {k: Counter() for k in _VERB_PATTERNS}
    actions: Counter = Counter()
    answers: Counter = Counter()
    recency: Counter = Counter()
    n_statements, gaps = [], Counter()
    for story in stories:
        statement_index: dict[int, int] = {}
        n = 0
        since_question = 0
        for line_id, ln in enumerate(story.lines, 1):
            if ln.is_question:
                answers[ln.answer] += 1
                newest = max(statement_index[s] for s in ln.support)
                recency[n - 1 - newest] += 1
                gaps[since_question] += 1
                since_question = 0
                continue
            statement_index[line_id] = n
            n += 1
            since_question += 1
            kind = "other"
            for kind, pattern in _VERB_PATTERNS.items():
                if m := pattern.match(ln.text):
                    verbs[kind][m.group(1)] += 1
                    break
            else:
                kind = "other"
            actions[kind] += 1
        n_statements.append(n)
    return {
        "verbs": {k: _shares(c) for k, c in verbs.items() if c},
        "actions": _shares(actions),
        "answers": _shares(answers),
        "recency": _shares(recency),
        "gaps": _shares(gaps),
        "statements": {"min": min(n_statements), "max": max(n_statements),
                       "median": sorted(n_statements)[len(n_statements) // 2]},
        "questions": sum(answers.values()),
    }


def _shares(counter: Counter) -> dict:
    total = sum(counter.values())
    return {k: v / total for k, v in sorted(counter.items(), key=lambda kv: str(kv[0]))}
