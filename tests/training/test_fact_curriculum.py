"""The fact-count curriculum of `lm2 finetune` (finetune.facts_start): the schedule, which rows each maximum
allows (cut rows keep a correct answer), exact resume across a step-up, and bad settings as one error line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lm2cli.errors import Lm2Error
from lm2cli.training.curriculum import STATE_KEY, FactSchedule, cut_to, facts_of, rows_up_to

from .conftest import REPO
from .test_finetune import finetune_args, metrics

# ------------------------------------------------------------------------------------------ the schedule


def test_steps_up_only_when_a_full_window_reaches_the_threshold():
    s = FactSchedule(top=4, step_em=0.5, window=3, current=2)
    assert s.observe(2, 2, rows_done=4) is None  # 100 % but the window is not full yet
    assert s.observe(2, 2, rows_done=8) is None
    s = FactSchedule(top=4, step_em=0.5, window=3, current=2)
    for rows_done, correct in ((4, 0), (8, 1), (12, 1)):  # 2 of 6 = 33 %: below
        assert s.observe(correct, 2, rows_done) is None
    assert s.current == 2 and s.window_em == pytest.approx(1 / 3)
    assert s.observe(1, 2, rows_done=16) == pytest.approx(0.5)  # window (1,1,1) of 6 = 50 %: exactly the threshold
    assert (s.current, s.level_rows, s.recent) == (3, 16, [])  # the window starts empty at the new maximum
    assert s.observe(2, 2, rows_done=20) is None  # one step is not a window


def test_never_past_the_most_facts_of_the_data():
    s = FactSchedule(top=3, step_em=0.5, window=1, current=2)
    assert s.observe(4, 4, rows_done=4) == 1.0 and s.current == 3
    for step in range(5):
        assert s.observe(4, 4, rows_done=8 + 4 * step) is None
    assert s.current == 3 and s.done


def test_state_round_trip_and_a_hand_edited_state_is_one_error():
    s = FactSchedule(top=10, step_em=0.9, window=4, current=2)
    for k in range(3):
        s.observe(k, 4, rows_done=4 * (k + 1))
    t = FactSchedule(top=10, step_em=0.9, window=4, current=2)
    t.restore(json.loads(json.dumps(s.state())), "ckpt/trainer_state.json")
    assert t.state() == s.state() == {"current": 2, "level_rows": 0, "recent": [[0, 4], [1, 4], [2, 4]]}
    for bad in ({"current": 0, "level_rows": 0, "recent": []}, {"current": 3, "level_rows": -1, "recent": []},
                {"current": 3, "level_rows": 0, "recent": [[5, 4]]}, [], {"current": "3"}):
        with pytest.raises(Lm2Error, match=r"ckpt/trainer_state.json: facts_curriculum must be"):
            t.restore(bad, "ckpt/trainer_state.json")


# ---------------------------------------------------------------------------------------------- the rows


def generated_rows(n_questions: int, seed: int) -> list[dict]:
    """qa1 rows at 0k exactly as `lm2 babilong` writes them (lm2's story generator, fact_spans, support)."""
    from lm2cli.data.babi import samples_of
    from lm2cli.data.babilong import build_row
    from lm2cli.data.stories import generate_stories

    class Words:  # build_row counts tokens; any tokenizer will do for that
        @staticmethod
        def encode(text):
            return text.split()

    stories = generate_stories("qa1", "train", seed, n_questions=n_questions)
    return [build_row(s, 0, 0, Words, None, None)[0] for s in samples_of(stories)]


def answer_of(context: str, question: str) -> str:
    """qa1 read independently of lm2: the room of the questioned person's latest move in `context`."""
    who = re.fullmatch(r"Where is (\w+)\?", question.strip()).group(1)
    moves = re.findall(rf"\b{who} (?:\w+ )+?to the (\w+)\.", context)
    return moves[-1] if moves else ""


@pytest.fixture(scope="module")
def examples():
    import dataclasses

    from lm2cli.data.examples import babilong_example

    rows = [dict(r, task="qa1", length="0k") for r in generated_rows(300, seed=5)]
    return [dataclasses.replace(babilong_example(Chars, r), row=r) for r in rows]


class Chars:
    """A stand-in tokenizer: one id per character, so a cut row's ids show exactly what text it holds."""

    bos_id, eos_id, answer_id = 1, 2, 4

    @staticmethod
    def encode(text):
        return [ord(c) for c in text]


def test_rows_at_a_maximum_are_cut_only_where_the_answer_survives(examples):
    counts = {facts_of(e, "x").count for e in examples}
    assert counts == {2, 4, 6, 8, 10}  # natural qa1: a question after every second statement
    for k in (1, 2, 3, 5, 9):
        kept = rows_up_to(examples, k, Chars)
        expected = [e for e in examples if facts_of(e, "x").needed <= k]
        assert len(kept) == len(expected) > 0
        for original, row in zip(expected, kept, strict=True):
            facts = facts_of(row, "x")
            assert facts.count == min(k, facts_of(original, "x").count)
            context = row.row["input"]
            # the first k facts of the original, nothing else, and still the right answer
            spans = original.row["fact_spans"][:facts.count]
            assert context == original.row["input"][:spans[-1][1]]
            assert answer_of(context, row.row["question"]) == original.row["target"] == row.text_answer
            assert row.prompt == [Chars.bos_id] + Chars.encode(f"{context} {row.row['question'].strip()}") + [4]
    # a row whose answer rests on a later fact waits for a larger maximum
    late = next(e for e in examples if facts_of(e, "x").needed == 4)
    assert cut_to(late, 3, Chars) is None and cut_to(late, 4, Chars) is not None
    assert all(answer_of(e.row["input"], e.row["question"]) == e.row["target"] for e in examples)


def test_rows_that_do_not_list_their_facts_are_one_error(cli, tiny_data, tmp_path):
    from .test_finetune import qa_rows

    root = tmp_path / "hub-like"
    (root / "qa1").mkdir(parents=True)
    (root / "qa1" / "0k.json").write_text(json.dumps(qa_rows(2, 20, seed=1)))  # input/question/target only
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "r", f"finetune.data={root}", "finetune.facts_start=2",
                                         "train.steps=1"))
    assert res.code == 2 and res.err.count("\n") == 1 and "Traceback" not in res.err
    assert str(root) in res.err and "no fact_spans/support" in res.err
    assert "finetune.facts_start = 0" in res.err and "qa1/0k.json" in res.err


@pytest.mark.parametrize("setting, message", [
    ("finetune.facts_step_em=1.5", "finetune.facts_step_em = 1.5"),
    ("finetune.facts_window=0", "finetune.facts_window = 0"),
    ("finetune.facts_start=-1", "finetune.facts_start = -1"),
    ("finetune.stages=[1, 2]", "finetune.facts_start = 2 needs a single stage"),
    ("finetune.format=jsonl", "the fact curriculum needs format = \"babilong\""),
])
def test_bad_settings_are_one_error_line(cli, setting, message, tmp_path):
    res = cli("finetune", REPO / "recipes" / "qa1.toml", "--set", setting, "--out", str(tmp_path / "r"))
    assert res.code == 2 and res.err.count("\n") == 1 and message in res.err and res.err.startswith("error: ")


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def fact_dir(tmp_path) -> Path:
    root = tmp_path / "facts"
    (root / "qa1").mkdir(parents=True)
    (root / "qa1" / "0k.json").write_text(json.dumps(generated_rows(200, seed=7)))
    return root


CURRICULUM = ("finetune.facts_start=2", "finetune.facts_window=2", "finetune.facts_step_em=0.2",
              "memory.segment_len=64", "model.arch=vanilla", "train.steps=24", "train.eval_every=12",
              "train.save_every=12")


def test_climbs_the_facts_and_resumes_exactly_across_a_step_up(cli, tiny_data, fact_dir, tmp_path,
                                                               interrupted_at):
    from lm2cli.training import checkpoints as ck

    sets = (f"finetune.data={fact_dir}", *CURRICULUM)
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "a", *sets))
    assert res.code == 0, res.err
    assert "fact curriculum: rows of up to 2 of at most 10 facts" in res.out
    rows = metrics(tmp_path / "a")
    ups = [r for r in rows if r["kind"] == "curriculum"]
    assert [r["facts_max"] for r in ups] == list(range(3, 3 + len(ups))) and len(ups) >= 2
    assert all(r["train_em"] >= 0.2 for r in ups) and ups[0]["step"] > 12  # step-ups after the save at 12
    state = ck.read_trainer_state(tmp_path / "a/checkpoints/step_00000012")[STATE_KEY]
    assert state["recent"] and state["current"] == 2  # the half-filled window is part of the state
    assert f"step {ups[0]['step']}: fact curriculum: training exact match" in res.out
    # stopped at step 12 (saved there), then resumed: the same steps, step-ups and validations
    with interrupted_at(12, 15):
        assert cli("finetune", *finetune_args(tiny_data, tmp_path / "b", *sets)).code == 143
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "b", *sets), "--resume")
    assert res.code == 0, res.err
    assert metrics(tmp_path / "b") == rows
    a, b = (ck.read_trainer_state(p / "checkpoints/step_00000024") for p in (tmp_path / "a", tmp_path / "b"))
    assert a[STATE_KEY] == b[STATE_KEY] and a["manifest"]["model.safetensors"] == b["manifest"]["model.safetensors"]


def test_validation_stays_on_the_natural_rows(tiny_data, fact_dir):
    from lm2cli.data.tokenizer import Tokenizer
    from lm2cli.recipe import load_recipe
    from lm2cli.training.finetune import FactCurriculumData, split_examples

    recipe = load_recipe(None, [f"finetune.data={fact_dir}", *CURRICULUM, "train.eval_batches=100"])
    tok = Tokenizer.load(tiny_data / "tokenizer.model")
    train, val, _ = split_examples(recipe, tok)
    schedule = FactSchedule.start(recipe, 10)
    data = FactCurriculumData(train, val, 10_000, recipe, tok, 0, "", 1, schedule=schedule, store={})
    assert {facts_of(e, "x").count for e in data.val} == {2, 4, 6, 8, 10}
    assert {facts_of(e, "x").count for e in data.train} <= {1, 2}


def test_each_maximum_starts_a_fresh_pass_over_its_rows(tiny_data, fact_dir):
    from lm2cli.data.tokenizer import Tokenizer
    from lm2cli.recipe import load_recipe
    from lm2cli.training.finetune import FactCurriculumData, split_examples

    recipe = load_recipe(None, [f"finetune.data={fact_dir}", *CURRICULUM, "finetune.facts_window=1"])
    tok = Tokenizer.load(tiny_data / "tokenizer.model")
    train, val, _ = split_examples(recipe, tok)
    store = {}
    data = FactCurriculumData(train, val, 10_000, recipe, tok, 0, "", 1, schedule=FactSchedule.start(recipe, 10),
                              store=store)
    change = data.after_step(rows_done=37, correct=4, rows=4)  # one step at 100 %: up to 3 facts from row 37
    assert change["facts_max"] == 3 and store[STATE_KEY] == {"current": 3, "level_rows": 37, "recent": []}
    data.collate = lambda examples: [id(e) for e in examples]  # which rows a batch holds
    assert sorted(data.batch(37, len(data.train))) == sorted(id(e) for e in data.train)  # each once, from row 37
