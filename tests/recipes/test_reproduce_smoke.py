"""reproduce.py --smoke: the whole issue-13 pipeline (tokenize, BABILong sets, pretrain and fine-tune five
models, lm2 eval side by side with the BM25 rows, inspect-memory, the results section) on tiny recipes, so the
pipeline cannot rot. Every number of the written section is checked against the files it was read from; a
rerun after a simulated interruption resumes the fine-tuning and reproduces the same numbers (same seed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import BABILONG

REPO = BABILONG.parents[1]
SECTIONS = ["## Results: smoke run", "### Accuracy against length", "### Per task", "### Settings and sample counts",
            "### Wall time of every stage", "### Memory of the trained LM2"]
MODELS = ["lm2", "lm2-delta", "rmt", "vanilla", "vanilla-window"]


def run_smoke(work: Path, results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BABILONG / "reproduce.py"), "--smoke", "--work", str(work),
                           "--results", str(results)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def table_rows(text: str, heading: str) -> list[list[str]]:
    """Body rows of the first markdown table after `heading`."""
    rows, started = [], False
    for line in text.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif started:
            break
    return rows[2:]  # header and rule


def expected_cell(c: dict) -> str:
    lo, hi = c["ci95"]
    return f"{c['accuracy']:.1f} ({lo:.0f}–{hi:.0f})"


def weights(run: Path) -> dict:
    from safetensors.torch import load_file
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / latest / "model.safetensors")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    work, results = root / "work", root / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nintro kept\n\n<!-- reproduce:smoke:start -->\nPLACEHOLDER\n"
                       "<!-- reproduce:smoke:end -->\n\ntrailer kept\n")
    proc = run_smoke(work, results)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, results, proc


@pytest.mark.slow
def test_every_stage_is_a_printed_lm2_command(smoke):
    work, _, proc = smoke
    printed = re.findall(r"^\[([^\]]+)\] \$ lm2 (\S+)", proc.stdout, flags=re.M)
    expected = [("tokenize", "tokenize")] + [(f"babilong-{s}", "babilong") for s in ("train", "val", "test")]
    for m in MODELS:
        expected += [(f"seed7/pretrain/{m}", "pretrain"), (f"seed7/finetune-base/{m}", "finetune"),
                     (f"seed7/finetune/{m}", "finetune")]
    expected += [("seed7/eval", "eval"), ("seed7/inspect-memory", "inspect-memory")]
    assert printed == expected
    assert len(list((work / "stages").glob("*.json"))) == len(expected)
    # each fine-tune starts from the stage before: pretraining -> base fine-tune (fact curriculum) -> long one
    commands = dict(re.findall(r"^\[([^\]]+)\] \$ (lm2 .*)$", proc.stdout, flags=re.M))
    for m in MODELS:
        assert f'finetune.init_from="{work}/seed7/pretrain/{m}"' in commands[f"seed7/finetune-base/{m}"]
        assert "finetune.facts_start=2" in commands[f"seed7/finetune-base/{m}"]
        assert f'finetune.init_from="{work}/seed7/finetune-base/{m}"' in commands[f"seed7/finetune/{m}"]
        assert "facts_start" not in commands[f"seed7/finetune/{m}"]


@pytest.mark.slow
def test_results_section_replaces_only_its_placeholder(smoke):
    _, results, _ = smoke
    text = results.read_text()
    assert text.startswith("# Results\n\nintro kept\n\n<!-- reproduce:smoke:start -->\n## Results: smoke run")
    assert text.endswith("<!-- reproduce:smoke:end -->\n\ntrailer kept\n")
    assert "PLACEHOLDER" not in text
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)


@pytest.mark.slow
def test_every_accuracy_comes_from_results_json(smoke):
    work, results, _ = smoke
    text = results.read_text()
    b = json.loads((work / "seed7" / "eval" / "results.json").read_text())["babilong"]
    cells = {(c["model"], c["task"], c["length"]): c for c in b["cells"] + b["averages"]}
    variants = b["variants"]
    assert variants == [m + s for m in MODELS for s in ("", "+bm25-top3", "+no-carry")
                        if s != "+no-carry" or not m.startswith("vanilla")]  # the control: models with memory
    headline = table_rows(text, "Paper-style table")
    assert [r[0] for r in headline] == variants
    assert headline == [[v] + [expected_cell(cells[(v, "qa1-qa5", n)]) for n in ("0k", "1k")] for v in variants]
    per_task = table_rows(text, "### Per task")
    tasks = ["qa1", "qa2", "qa3", "qa4", "qa5", "qa1-qa5"]
    assert per_task == [[t, v] + [expected_cell(cells[(v, t, n)]) for n in ("0k", "1k")]
                        for t in tasks for v in variants]
    assert "Samples per cell (each task × length, every model): 0k: 3, 1k: 3." in text
    assert (results.parent / "figures" / "results-smoke" / "accuracy_vs_length.png").stat().st_size > 1000


@pytest.mark.slow
def test_every_model_saw_the_same_samples(smoke):
    work, _, _ = smoke
    seen = {}
    for line in (work / "seed7" / "eval" / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        seen.setdefault(p["model"], []).append((p["task"], p["length"], p["index"], p["question"], p["target"]))
    # each also with BM25, and the three with memory (lm2, lm2-delta, rmt) with their carry off
    assert len(seen) == 2 * len(MODELS) + 3 and len({tuple(v) for v in seen.values()}) == 1


@pytest.mark.slow
def test_wall_times_and_memory_figures_are_the_measured_ones(smoke):
    work, results, _ = smoke
    text = results.read_text()
    rows = {r[0]: r for r in table_rows(text, "### Wall time of every stage")}
    for record in (work / "stages").glob("*.json"):
        name = record.stem.replace("__", "/")
        assert rows[name][1] == f"{json.loads(record.read_text())['wall_s']:.1f}"
    summary = json.loads((work / "seed7" / "inspect" / "summary.json").read_text())
    memory = table_rows(text, "### Memory of the trained LM2")
    assert [r[0] for r in memory] == list(summary["layers"]) == ["0", "1"]
    for row in memory:
        assert row[1] == f"{summary['layers'][row[0]]['facts']['ratio']:.3f}"
    for png in (work / "seed7" / "inspect").glob("*.png"):
        assert (results.parent / "figures" / "results-smoke" / png.name).read_bytes() == png.read_bytes()
        assert f"(figures/results-smoke/{png.name})" in text


@pytest.mark.slow
def test_rerun_resumes_an_interrupted_stage_and_reproduces_the_numbers(smoke):
    """Fine-tuning of lm2 interrupted after its first curriculum stage and the evaluation unfinished: the rerun
    skips every finished stage, continues the fine-tuning with --resume (bitwise the same weights), evaluates
    again (the old evaluation moved aside, not deleted) and gets the same numbers: same seed, same results."""
    work, results, _ = smoke
    run = work / "seed7" / "finetune" / "lm2"
    before = weights(run)
    old_eval = json.loads((work / "seed7" / "eval" / "results.json").read_text())["babilong"]
    ckpts = run / "checkpoints"
    final, first_stage = (ckpts / "latest").read_text().strip(), (ckpts / "best_stage_1").read_text().strip()
    shutil.rmtree(ckpts / final)
    for pointer in ("latest", "best"):
        (ckpts / pointer).write_text(first_stage)
    (ckpts / "best_stage_2").unlink()
    (work / "stages" / "seed7__finetune__lm2.json").unlink()
    (work / "stages" / "seed7__eval.json").unlink()

    proc = run_smoke(work, results)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = re.findall(r"^\[([^\]]+)\] \$ (lm2 .*)$", proc.stdout, flags=re.M)
    assert [name for name, _ in ran][:2] == ["seed7/finetune/lm2", "seed7/eval"]
    assert ran[0][1].endswith(" --resume")
    assert "[seed7/pretrain/lm2] done earlier" in proc.stdout
    assert "[seed7/finetune-base/lm2] done earlier" in proc.stdout and "[tokenize] done earlier" in proc.stdout
    after = weights(run)
    assert after.keys() == before.keys() and all((after[k] == before[k]).all() for k in after)
    assert len(list((work / "seed7").glob("eval.earlier-*/results.json"))) == 1
    new_eval = json.loads((work / "seed7" / "eval" / "results.json").read_text())["babilong"]
    assert numbers(new_eval) == numbers(old_eval)


def numbers(babilong: dict) -> list[dict]:
    """Every BABILong number of a results.json, without the speed of decoding (a timing, not a result)."""
    return [{k: v for k, v in c.items() if k != "samples_per_s"} for c in babilong["cells"] + babilong["averages"]]
