"""The fact-count curriculum of `lm2 finetune` (finetune.facts_start > 0): BABILong rows with few facts first.

Why: a small model trained from scratch on natural qa1 rows (2-10 facts, names repeating, the latest move wins)
sits at the "room of the last fact" shortcut for thousands of steps; learning "the latest of k facts about this
name" from 2 facts upwards takes it past (docs/training.md, measured there).

The rule: training starts on rows of at most `facts_start` facts. After every optimizer step the exact match of
that step's rows (teacher-forced argmax at the answer positions, from the training forward itself) joins a
window of the last `facts_window` steps; when the window is full and its exact match reaches `facts_step_em`,
the maximum grows by one fact (never past the most facts a training row has) and the window starts empty.

Rows at a maximum of k facts: a row with at most k facts as it is; a row with more is cut after its k-th fact
when every fact the answer rests on (`support`) is among the first k — the answer cannot change, because no
later fact is kept that could move anyone — else it waits for a larger k. Rows from `lm2 babilong` list their
facts (`fact_spans`, character spans in `input`, and `support`, indices into them). Validation always scores
the natural rows.

What resume needs (the maximum, the row count at which it was reached, the window) is a small JSON object in
the checkpoint's trainer state; the row order at a maximum is a seeded permutation of that level's rows, so a
resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lm2cli.data.examples import Example, babilong_example
from lm2cli.errors import Lm2Error

STATE_KEY = "facts_curriculum"  # its key in trainer_state.json


# ------------------------------------------------------------------------------------------ the rows


@dataclass(frozen=True)
class Facts:
    count: int  # facts in the row
    needed: int  # the answer rests on facts[:needed] (its last supporting fact is fact needed - 1)


def facts_of(example: Example, where: str) -> Facts:
    """How many facts a row has and how many of the first ones its answer needs; one error line if the row does
    not list them."""
    row = example.row or {}
    spans, support = row.get("fact_spans"), row.get("support")
    place = f"{where} ({row.get('task', '?')}/{row.get('length', '?')}.json, question {row.get('question', '?')!r})"
    if not isinstance(spans, list) or not isinstance(support, list):
        raise Lm2Error(f"{place}: the row has no fact_spans/support, which finetune.facts_start > 0 needs; rows "
                       f"built by `lm2 babilong` list their facts (hub rows do not): rebuild the set, or set "
                       f"finetune.facts_start = 0")
    n = len(spans)
    ok_spans = all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s)
                   and 0 <= s[0] <= s[1] <= len(row.get("input", "")) for s in spans)
    ok_support = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in support)
    if not (n and ok_spans and ok_support):
        raise Lm2Error(f"{place}: fact_spans must be [start, end] character spans in input and support indices "
                       f"into them (got {len(spans)} spans, support {support[:5]})")
    return Facts(n, max(support) + 1 if support else n)


def cut_to(example: Example, k: int, tokenizer) -> Example | None:
    """The row with at most `k` facts: itself, cut after its k-th fact, or None when its answer needs more."""
    facts = facts_of(example, "finetune.data")
    if facts.count <= k:
        return example
    if facts.needed > k:
        return None
    row = example.row
    spans = row["fact_spans"][:k]
    short = dict(row, input=row["input"][:spans[-1][1]], fact_spans=spans)
    return dataclasses.replace(babilong_example(tokenizer, short), row=short)


def rows_up_to(examples: list[Example], k: int, tokenizer) -> list[Example]:
    return [e for e in (cut_to(x, k, tokenizer) for x in examples) if e is not None]


def most_facts(examples: list[Example], where: str) -> int:
    """The most facts a row has, every row's facts checked first (one error line naming `where`)."""
    return max(facts_of(e, where).count for e in examples)


# ---------------------------------------------------------------------------------------- the schedule


@dataclass
class FactSchedule:
    """The adaptive maximum: when to allow one more fact per row. Pure bookkeeping, no tensors."""

    top: int  # the most facts any training row has: the maximum never goes past it
    step_em: float  # window exact match that earns a step-up
    window: int  # steps in the window
    current: int  # facts per row allowed now
    level_rows: int = 0  # the data cursor (rows done) when `current` was reached: row order restarts there
    recent: list[list[int]] = field(default_factory=list)  # [correct rows, answer rows] of the last steps

    @classmethod
    def start(cls, recipe, top: int) -> FactSchedule:
        f = recipe.finetune
        return cls(top=top, step_em=f.facts_step_em, window=f.facts_window, current=min(f.facts_start, top))

    @property
    def window_em(self) -> float | None:
        rows = sum(r for _, r in self.recent)
        return sum(c for c, _ in self.recent) / rows if rows else None

    @property
    def done(self) -> bool:
        return self.current >= self.top

    def observe(self, correct: int, rows: int, rows_done: int) -> float | None:
        """Record one step's exact match (`correct` of `rows` answer rows; `rows_done` is the data cursor after
        the step). Returns the window's exact match when it just earned one more fact, else None."""
        if self.done:
            return None
        self.recent = (self.recent + [[int(correct), int(rows)]])[-self.window:]
        em = self.window_em
        if len(self.recent) < self.window or em is None or em < self.step_em:
            return None
        self.current += 1
        self.level_rows, self.recent = rows_done, []
        return em

    def state(self) -> dict:
        return {"current": self.current, "level_rows": self.level_rows, "recent": [list(r) for r in self.recent]}

    def restore(self, saved, where: str) -> None:
        """Continue from a checkpoint's state (checked: a hand-edited file gives one line, never a traceback)."""

        def is_int(x, low=0) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= low

        ok = (isinstance(saved, dict) and is_int(saved.get("current"), 1) and is_int(saved.get("level_rows"))
              and isinstance(saved.get("recent"), list)
              and all(isinstance(r, list) and len(r) == 2 and is_int(r[0]) and is_int(r[1]) and r[0] <= r[1]
                      for r in saved["recent"]))
        if not ok:
            raise Lm2Error(f"{where}: {STATE_KEY} must be {{\"current\": <facts >= 1>, \"level_rows\": <int >= 0>, "
                           f"\"recent\": [[correct, rows], ...]}}; resume from another checkpoint with --resume-from")
        self.current = min(saved["current"], self.top)
        self.level_rows = saved["level_rows"]
        self.recent = [list(r) for r in saved["recent"]][-self.window:]


def describe_start(schedule: FactSchedule, n_rows: int) -> str:
    if schedule.done:
        return (f"fact curriculum: rows of up to {schedule.current} facts, the most any training row has "
                f"({n_rows:,} rows): nothing left to step up")
    return (f"fact curriculum: rows of up to {schedule.current} of at most {schedule.top} facts ({n_rows:,} rows); "
            f"one more when the training exact match over {schedule.window} steps reaches {schedule.step_em:.0%}")

