"""reproduce.py's report from several seeds' results.json (the --quick run's spread) and its marked section."""

from __future__ import annotations

import statistics

from lm2cli.evaluation.metrics import wilson_interval

from .conftest import load_reproduce


def results(correct_by_model: dict[str, list[int]], n: int = 20) -> dict:
    """A results.json's BABILong part for one task (qa1) at 0k and 1k, as lm2 eval writes it."""
    cells = []
    for model, corrects in correct_by_model.items():
        for length, correct in zip(["0k", "1k"], corrects, strict=True):
            cells.append({"model": model, "task": "qa1", "length": length, "n": n, "correct": correct,
                          "accuracy": 100 * correct / n, "ci95": list(wilson_interval(correct, n))})
    return {"complete": True, "babilong": {"tasks": ["qa1"], "lengths": ["0k", "1k"], "averages": [],
                                           "variants": list(correct_by_model), "cells": cells}}


def test_several_seeds_give_mean_sd_and_range_and_the_pooled_interval():
    reproduce = load_reproduce()
    runs = {1: results({"lm2": [20, 10], "rmt": [4, 2]}), 2: results({"lm2": [18, 14], "rmt": [6, 2]}),
            3: results({"lm2": [19, 6], "rmt": [5, 2]})}
    rows = {r.split(" | ")[0].strip("| "): r for r in reproduce.headline_section(runs) if r.startswith("| ")}
    accs = [50.0, 70.0, 30.0]  # lm2 at 1k over the three seeds
    assert f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f} [30–70]" in rows["lm2"]
    assert "10.0 ± 0.0 [10–10]" in rows["rmt"]
    table = reproduce.cell_table(runs)
    mean, lo, hi = reproduce.pooled(table[("lm2", "qa1", "1k")])
    assert (mean, lo, hi) == (50.0, *wilson_interval(30, 60))
    one = reproduce.pooled(table[("lm2", "qa1", "1k")][:1])
    assert one == (50.0, *wilson_interval(10, 20))


def test_one_task_headline_is_that_task_and_an_unfinished_eval_is_refused(tmp_path):
    reproduce = load_reproduce()
    r = results({"lm2": [20, 10]})
    assert reproduce.headline_task(r) == "qa1"
    (tmp_path / "results.json").write_text('{"complete": false, "babilong": {}}')
    try:
        reproduce.read_results(tmp_path)
    except reproduce.PipelineError as e:
        assert "not a finished evaluation" in str(e)
    else:
        raise AssertionError("an incomplete results.json was accepted")


def test_write_section_replaces_its_own_markers_only_and_appends_when_absent(tmp_path):
    reproduce = load_reproduce()
    f = tmp_path / "results.md"
    f.write_text("intro\n<!-- reproduce:quick:start -->\nold quick\n<!-- reproduce:quick:end -->\nmiddle\n"
                 "<!-- reproduce:full:start -->\nold full\n<!-- reproduce:full:end -->\nend\n")
    reproduce.write_section(f, "quick", "new quick\n")
    assert f.read_text() == ("intro\n<!-- reproduce:quick:start -->\nnew quick\n<!-- reproduce:quick:end -->\n"
                             "middle\n<!-- reproduce:full:start -->\nold full\n<!-- reproduce:full:end -->\nend\n")
    reproduce.write_section(f, "smoke", "smoke\n")
    assert f.read_text().endswith("end\n\n<!-- reproduce:smoke:start -->\nsmoke\n<!-- reproduce:smoke:end -->\n")
    new = tmp_path / "sub" / "new.md"
    reproduce.write_section(new, "full", "x\n")
    assert new.read_text() == "<!-- reproduce:full:start -->\nx\n<!-- reproduce:full:end -->\n"


def test_the_inspection_table_reads_slot_and_associative_summaries():
    reproduce = load_reproduce()
    slot = {"layers": {"0": {"segments": [{"in_gate": 0.5, "forget_gate": 0.75, "out_gate": 0.25}],
                             "facts": {"ratio": 1.5, "answer_read_on_fact_slots": 0.4, "answer_read_even": 0.25},
                             "supporting_facts": {"ratio": 2.0}}}}
    assert reproduce.inspect_table(slot)[2:] == ["| 0 | 1.500 | 2.000 | 0.400 (0.250) | 0.500 | 0.750 | 0.250 |"]
    associative = {"layers": {"1": {"memory": "associative", "beta_mean": 0.5,
                                    "segments": [{"out_gate": 0.2}, {"out_gate": 0.4, "open": True}],
                                    "facts": {"write_ratio": 1.25, "answer_read_on_facts": 0.9,
                                              "answer_read_even": 0.01},
                                    "supporting_facts": {"write_ratio": 1.5}}}}
    table = reproduce.inspect_table(associative)
    assert table[0].startswith("| block | write ratio facts |")
    assert table[2:] == ["| 1 | 1.250 | 1.500 | 0.900 (0.010) | — | 0.500 | 0.300 |"]
