"""The BABILong grid end to end below the CLI: prompt assembly, decoding, scoring, the plan's checks."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lm2cli.errors import Lm2Error
from lm2cli.evaluation.babilong import evaluate_cell, plan_babilong, prompt_ids, prompt_text
from lm2cli.evaluation.decode import StateRunner
from lm2cli.recipe import load_recipe

from .conftest import TableModel, write_babilong


def eval_cfg(data, *sets):
    return load_recipe(None, [f"eval.data={json.dumps(str(data))}", 'eval.tasks=["qa1", "qa2"]',
                              'eval.lengths=["0k", "1k"]', *sets]).eval


def table_runner(tokenizer, plan, answer_of, batch_size=5):
    """A runner over a model that answers every prompt of the plan with answer_of(task, row)."""
    table = {}
    for (task, _), rows in plan.rows.items():
        for row in rows:
            ids = prompt_ids(tokenizer, task, row, plan.mode, plan.prompt_parts)
            table[tuple(ids)] = tokenizer.encode(answer_of(task, row))
    return StateRunner(TableModel(tokenizer.vocab_size, tokenizer.eos_id, table), 16, "cpu", batch_size)


@pytest.mark.parametrize("mode", ["finetune-em", "prompt-strict", "prompt-compat"])
def test_oracle_scores_100(tmp_path, tokenizer, mode):
    plan = plan_babilong(eval_cfg(write_babilong(tmp_path / "bl"), f"eval.mode={mode}"), "RECIPE")
    runner = table_runner(tokenizer, plan, lambda task, row: row["target"])
    for task, length in plan.rows:
        cell = evaluate_cell(runner, tokenizer, plan, task, length, "oracle")
        assert cell.n == 12 and cell.correct == 12, (task, length, cell.predictions[:2])
        assert all(p["output"] == p["target"] for p in cell.predictions)


def test_constant_answer_scores_its_label_frequency(tmp_path, tokenizer):
    plan = plan_babilong(eval_cfg(write_babilong(tmp_path / "bl", samples=40, seed=3)), "RECIPE")
    runner = table_runner(tokenizer, plan, lambda task, row: "garden")
    for (task, length), rows in plan.rows.items():
        cell = evaluate_cell(runner, tokenizer, plan, task, length, "garden")
        share = Counter(r["target"] for r in rows)["garden"] / len(rows)
        assert 0 < share < 1  # the fixture has both kinds of targets
        assert cell.accuracy == pytest.approx(100 * share)


def test_finetune_em_uses_the_fine_tuning_assembly(tokenizer):
    from lm2cli.data.examples import babilong_example  # what fine-tuning assembles (load_examples)

    row = {"input": "  Mary went to the garden.  ", "question": " Where is Mary? ", "target": "garden"}
    ids = prompt_ids(tokenizer, "qa1", row, "finetune-em", [])
    assert ids == babilong_example(tokenizer, row).prompt
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.answer_id
    assert tokenizer.decode(ids[1:-1]) == "Mary went to the garden. Where is Mary?"


def test_prompt_parts_and_layout():
    full = prompt_text("qa1", " Mary went to the garden. ", "Where is Mary?", ["instruction", "examples",
                                                                              "post_prompt"])
    assert full.index("Answer the question") < full.index("<example>") < full.index("Reply with") \
        < full.index("<context>\nMary went to the garden.\n</context>")
    assert full.endswith("</context>\n\nQuestion: Where is Mary?")
    bare = prompt_text("qa1", "Mary went to the garden.", "Where is Mary?", [])
    assert bare == "<context>\nMary went to the garden.\n</context>\n\nQuestion: Where is Mary?"
    assert "<example>" not in prompt_text("qa2", "x", "y?", ["instruction", "post_prompt"])


def test_samples_are_the_first_rows_and_retrieval_is_its_own_variant(tmp_path):
    plan = plan_babilong(eval_cfg(write_babilong(tmp_path / "bl"), "eval.samples=5"), "RECIPE")
    first = json.loads((tmp_path / "bl" / "qa1" / "1k.json").read_text())[:5]
    assert plan.rows[("qa1", "1k")] == first
    assert plan.variants(has_memory=True) == [""]
    plan.retrieval, plan.no_carry = "bm25", True
    assert plan.variants(has_memory=True) == ["", "bm25", "no-carry"]
    assert plan.variants(has_memory=False) == ["", "bm25"]  # nothing to cut in a model without memory


def test_missing_data_names_the_command_that_builds_it(tmp_path):
    with pytest.raises(Lm2Error) as e:
        plan_babilong(eval_cfg(tmp_path / "nowhere"), "recipes/small.toml")
    msg = str(e.value)
    assert "lm2 babilong recipes/small.toml" in msg and "babilong.tasks=[\"qa1\", \"qa2\"]" in msg
    assert "babilong.lengths=[\"0k\", \"1k\"]" in msg


def test_task_or_length_not_in_data(tmp_path):
    root = write_babilong(tmp_path / "bl", tasks=("qa1",), lengths=("0k",))
    with pytest.raises(Lm2Error, match=r"no qa1/1k, qa2/0k, qa2/1k \(it has qa1/0k\)"):
        plan_babilong(eval_cfg(root), "RECIPE")


def test_odd_file_and_folder_names_in_the_data_are_listed_escaped(tmp_path):
    root = write_babilong(tmp_path / "bl", tasks=("qa1",), lengths=("0k",))
    for odd in ("qax/0k.json", "qa10/0k.json", "qa1/\x1b[2J.json"):
        (root / odd).parent.mkdir(exist_ok=True)
        (root / odd).write_text("[]")
    with pytest.raises(Lm2Error) as e:  # a folder qax once raised ValueError from the sort
        plan_babilong(eval_cfg(root), "RECIPE")
    assert "\x1b" not in str(e.value)
    assert "(it has qa1/0k, 'qa1/\\x1b[2J', qax/0k, qa10/0k)" in str(e.value)


def test_hub_name_offline_is_one_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'RMT-team/babilong' on the Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Lm2Error, match="not a local directory, and as a hub dataset: .*cannot be reached.*"
                                       "to build a local set instead: `lm2 babilong RECIPE"):
        plan_babilong(eval_cfg("RMT-team/babilong"), "RECIPE")


def test_hub_rows_in_both_orders(tmp_path, monkeypatch):
    """A hub name is read through load_babilong (config = length, split = task, or the older order)."""
    import datasets

    rows = [{"input": "Mary went to the garden.", "question": "Where is Mary?", "target": "garden"}] * 3

    def fake(name, config, **kwargs):  # corpus.load_dataset adds trust_remote_code=False
        assert name == "RMT-team/babilong"  # the booydar alias is resolved
        if config.startswith("qa"):
            return {"0k": rows, "1k": rows}
        raise ValueError(f"BuilderConfig {config} not found")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.chdir(tmp_path)
    plan = plan_babilong(eval_cfg("booydar/babilong"), "RECIPE")
    assert plan.rows[("qa2", "1k")] == rows and plan.data["kind"] == "hub"


def test_a_missing_local_path_is_not_taken_for_a_hub_name(tmp_path, monkeypatch):
    """eval.data = data/babilong (the default) with a local data/ folder: a missing local set, whose message
    says how to build it, even though the name looks like owner/name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(Lm2Error, match=r"eval.data = data/babilong: no such BABILong directory; build it with "
                                       r"`lm2 babilong RECIPE --out data/babilong"):
        plan_babilong(eval_cfg("data/babilong"), "RECIPE")


def test_retrieval_without_its_extra_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bm25s", None)  # as if not installed
    with pytest.raises(Lm2Error, match=r'needs the bm25s package: pip install "lm2\[retrieval\]"'):
        plan_babilong(eval_cfg(write_babilong(tmp_path / "bl"), "eval.retrieval=bm25"), "RECIPE")


def test_retrieval_keeps_the_best_sentences_in_order():
    pytest.importorskip("bm25s")
    from lm2cli.evaluation.retrieval import top_sentences

    context = ("The sun rose over the hills. Mary went to the kitchen. A dog barked. John took the apple. "
               "Mary moved to the garden. The wind was cold.")
    assert top_sentences(context, "Where is Mary?", 2) == "Mary went to the kitchen. Mary moved to the garden."
    assert top_sentences("One. Two.", "Where is Mary?", 5) == "One. Two."


def test_average_rows_need_every_task_of_their_range():
    from lm2cli.evaluation.babilong import averages
    from lm2cli.evaluation.metrics import wilson_interval

    cells = [{"model": "m", "task": f"qa{i}", "length": "0k", "n": 10, "correct": i, "accuracy": 10.0 * i}
             for i in range(1, 6)]
    (row,) = averages(cells, [f"qa{i}" for i in range(1, 6)], ["0k"])
    assert row["task"] == "qa1-qa5" and row["accuracy"] == 30.0 and (row["n"], row["correct"]) == (50, 15)
    assert row["ci95"] == [round(x, 4) for x in wilson_interval(15, 50)]
    assert averages(cells[:4], ["qa1", "qa2", "qa3", "qa4"], ["0k"]) == []  # qa1-qa5 incomplete: no row


def test_accuracy_is_split_by_where_the_supporting_fact_lies(tmp_path, tokenizer):
    """Rows that say where their facts are (built by `lm2 babilong`) are scored twice more: where the newest
    supporting fact is the story's last fact, and where others follow. A model that answers the last fact's
    place scores 100 % and 0 %; rows that do not say (hub rows, malformed support) are in neither group."""
    facts = ["Mary went to the kitchen.", "John went to the garden."]
    text = " ".join(facts)
    spans = [[0, len(facts[0])], [len(facts[0]) + 1, len(text)]]
    rows = [{"input": text, "question": f"Where is {who}? ", "target": place, "fact_spans": spans, "support": [i % 2]}
            for i, (who, place) in enumerate([("Mary", "kitchen"), ("John", "garden")] * 3)]
    rows += [{"input": text, "question": "Where is John? ", "target": "garden"},
             {"input": text, "question": "Where is John? ", "target": "garden", "fact_spans": spans, "support": ["1"]}]
    (tmp_path / "qa1").mkdir()
    (tmp_path / "qa1" / "0k.json").write_text(json.dumps(rows))
    plan = plan_babilong(load_recipe(None, [f"eval.data={json.dumps(str(tmp_path))}", 'eval.tasks=["qa1"]',
                                            'eval.lengths=["0k"]']).eval, "RECIPE")
    runner = table_runner(tokenizer, plan, lambda task, row: "garden")
    cell = evaluate_cell(runner, tokenizer, plan, "qa1", "0k", "latest-fact")
    assert [p.get("support_last") for p in cell.predictions] == [False, True] * 3 + [None, None]
    split = cell.summary()["by_support"]
    assert (split["last"]["n"], split["last"]["correct"]) == (3, 3)
    assert (split["earlier"]["n"], split["earlier"]["correct"]) == (3, 0)
    assert cell.correct == 5  # the two rows that do not say still count in the cell

    from lm2cli.evaluation.report import support_section

    section = "\n".join(support_section([cell.summary()]))
    assert "| qa1 | latest-fact | 0k | 100.0 (" in section and ", 3 rows | 0.0 (" in section


def test_the_rows_digest_is_of_their_text_only(tmp_path):
    """results.json's rows_sha256 names the rows evaluated: the same texts give the same digest whether or not
    the rows also say where their facts are (so results before and after the support split compare)."""
    rows = [{"input": "Mary went to the kitchen.", "question": "Where is Mary? ", "target": "kitchen"}]
    plans = []
    for name, extra in (("plain", {}), ("located", {"fact_spans": [[0, 25]], "support": [0]})):
        (tmp_path / name / "qa1").mkdir(parents=True)
        (tmp_path / name / "qa1" / "0k.json").write_text(json.dumps([dict(r, **extra) for r in rows]))
        plans.append(plan_babilong(load_recipe(None, [f"eval.data={json.dumps(str(tmp_path / name))}",
                                                      'eval.tasks=["qa1"]', 'eval.lengths=["0k"]']).eval, "RECIPE"))
    assert plans[1].rows[("qa1", "0k")][0]["support_last"] is True
    assert plans[0].data["rows_sha256"] == plans[1].data["rows_sha256"]
