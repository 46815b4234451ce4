"""`lm2 eval` through the CLI: results files, side-by-side models, settings, bad input, Ctrl-C."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm2cli.evaluation.report import fmt_accuracy, read_results, render_markdown

from .conftest import write_babilong, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """Two runs of the same tokenizer (an LM2 with a window and a vanilla model), a BABILong directory and a
    text file for perplexity."""
    root = tmp_path_factory.mktemp("eval-world")
    write_checkpoint(root / "runs" / "lm2", tokenizer, "attention.window=24", seed=1)
    write_checkpoint(root / "runs" / "vanilla", tokenizer, "model.arch=vanilla", "attention.window=24", seed=2,
                     step=7)
    write_babilong(root / "bl", samples=6)
    (root / "book.txt").write_text("Mary went to the garden. John went to the office. " * 30)
    return root


def sets(world, *more: str) -> list[str]:
    out = []
    for s in [f"eval.data={json.dumps(str(world / 'bl'))}", 'eval.tasks=["qa1", "qa2"]',
              'eval.lengths=["0k", "1k"]', f'eval.ppl_data=["{world / "book.txt"}"]', "eval.ppl_seq_len=128",
              "eval.ppl_tokens=300", *more]:
        out += ["--set", s]
    return out


def md_table(md: str, heading: str) -> list[list[str]]:
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_eval_writes_results_that_read_back_and_agree(cli, world, tmp_path):
    out = tmp_path / "res"
    r = cli("eval", world / "runs" / "lm2", *sets(world), "--out", out)
    assert r.code == 0, r.err
    results = read_results(out)
    assert results["complete"] is True and results["status"] == "complete"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json", "results.csv", "results.md", "predictions.jsonl", "accuracy_vs_length.png",
         "loss_vs_position.png"])
    b = results["babilong"]
    assert b["mode"] == "finetune-em" and b["data"]["rows_sha256"] and len(b["cells"]) == 4
    assert results["models"][0]["step"] == 1 and len(results["models"][0]["sha256"]) == 64
    # the markdown table is the JSON
    md = (out / "results.md").read_text()
    assert md == render_markdown(results) and md in r.out
    table = md_table(md, "BABILong")
    by_key = {(c["task"], c["length"]): c for c in b["cells"]}
    assert [row[0] for row in table] == ["qa1", "qa2"]
    for row in table:
        assert row[1:] == [fmt_accuracy(by_key[(row[0], n)]) for n in ("0k", "1k")]
    # so is the csv, and the predictions are the cells' answers
    rows = list(csv.DictReader(open(out / "results.csv")))
    acc = {(x["task"], x["length"]): float(x["value"]) for x in rows if x["section"] == "babilong"}
    assert acc == {k: c["accuracy"] for k, c in by_key.items()}
    preds = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert len(preds) == 24 and set(preds[0]) >= {"target", "output", "question", "correct", "task", "length",
                                                  "model"}
    for (task, length), c in by_key.items():
        assert sum(p["correct"] for p in preds if (p["task"], p["length"]) == (task, length)) == c["correct"]
    ppl = results["perplexity"]["results"][0]
    assert ppl["tokens"] == 300 and md_table(md, "Perplexity")[0][2] == f"{ppl['loss']:.4f}"


def test_models_side_by_side_on_the_same_samples(cli, world, tmp_path):
    out = tmp_path / "res"
    r = cli("eval", world / "runs" / "lm2", world / "runs" / "vanilla", *sets(world, 'eval.run=["babilong"]'),
            "--out", out, "--json")
    assert r.code == 0, r.err
    results = json.loads(r.out)
    assert results == read_results(out)
    assert results["babilong"]["variants"] == ["lm2", "vanilla"]
    assert [m["step"] for m in results["models"]] == [1, 7]
    table = md_table((out / "results.md").read_text(), "BABILong")
    assert [(row[0], row[1]) for row in table] == [("qa1", "lm2"), ("qa1", "vanilla"), ("qa2", "lm2"),
                                                  ("qa2", "vanilla")]
    preds = [json.loads(line) for line in open(out / "predictions.jsonl")]
    questions = {m: [p["question"] for p in preds if p["model"] == m] for m in ("lm2", "vanilla")}
    assert questions["lm2"] == questions["vanilla"] and len(questions["lm2"]) == 24


def test_settings_come_from_the_first_recipe_with_set(cli, world, tmp_path, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[output]\ndir = "{world / "runs" / "lm2"}"\n\n[eval]\nrun = ["babilong"]\n'
                      f'data = "{world / "bl"}"\ntasks = ["qa2"]\nlengths = ["1k"]\nsamples = 2\n')
    r = cli("eval", recipe, "--set", "eval.samples=3", "--out", tmp_path / "a")
    assert r.code == 0, r.err
    cells = read_results(tmp_path / "a")["babilong"]["cells"]
    assert [(c["task"], c["length"], c["n"]) for c in cells] == [("qa2", "1k", 3)]
    # no argument: the default recipe's run (runs/small), its stored recipe's [eval] with --set
    monkeypatch.chdir(world)
    (world / "runs" / "small").symlink_to(world / "runs" / "lm2")
    try:
        r = cli("eval", *sets(world, 'eval.run=["babilong"]', 'eval.tasks=["qa1"]', 'eval.lengths=["0k"]'),
                "--set", "eval.name=named")
        assert r.code == 0, r.err
        assert read_results(world / "runs" / "small" / "eval" / "named")["babilong"]["cells"][0]["n"] == 6
    finally:
        (world / "runs" / "small").unlink()


def one_error(r) -> str:
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.err, r.err
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(cli, world, tmp_path, tokenizer):
    run = world / "runs" / "lm2"
    base = sets(world, 'eval.run=["babilong"]')
    msg = one_error(cli("eval", run, *base, "--set", f"eval.data={tmp_path / 'none'}", "--out", tmp_path / "o"))
    assert "lm2 babilong" in msg and "babilong.lengths" in msg
    assert not (tmp_path / "o").exists()  # nothing written
    msg = one_error(cli("eval", run, *base, "--set", 'eval.lengths=["0k", "2k"]', "--out", tmp_path / "o"))
    assert "qa1/2k" in msg and "it has" in msg
    assert "eval.* keys" in one_error(cli("eval", run, "--set", "train.lr=1", "--out", tmp_path / "o"))
    assert "did you mean 'samples'" in one_error(cli("eval", run, "--set", "eval.sample=3"))
    msg = one_error(cli("eval", run, tmp_path / "no-run"))  # the shared resolver's words, as generate's
    assert "no-run: not found (expected a run directory" in msg and "recipe .toml file" in msg
    # a model with another tokenizer: the samples would differ
    from lm2cli.data.tokenizer import train_tokenizer

    other = train_tokenizer(["Bill went to the park. The sun shone."] * 50, model_type="bpe", vocab_size=290,
                            byte_fallback=True, character_coverage=1.0, sample_sentences=1000,
                            answer_token="<ans>", extra_symbols=[], seed=1)
    write_checkpoint(tmp_path / "other", other)
    assert "different tokenizers" in one_error(cli("eval", run, tmp_path / "other", *base))
    # results already there are never overwritten
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    assert "already holds results" in one_error(cli("eval", run, *base, "--out", tmp_path / "done"))
    # a full-attention model cannot take a length beyond model.max_seq_len
    write_checkpoint(tmp_path / "short", tokenizer, "model.max_seq_len=500")
    msg = one_error(cli("eval", tmp_path / "short", *base, "--out", tmp_path / "o"))
    assert "exceed model.max_seq_len = 500" in msg and "1k" in msg


def test_every_problem_of_the_arguments_is_its_own_line(cli, world, tmp_path):
    """A defective recipe as the target and defective --set arguments: one `error:` line per problem, exit 2,
    no traceback (what tests/test_cli_fuzz.py checks for the recipe commands)."""
    def errors(r) -> list[str]:
        assert r.code == 2 and "Traceback" not in r.err, r.err
        return [ln for ln in r.err.splitlines() if ln.startswith("error: ")]

    recipe = tmp_path / "bad.toml"
    recipe.write_text("[model]\nd_model = -3\n[train]\nlr = \"fast\"\n")
    got = errors(cli("eval", recipe))
    assert len(got) == 2 and "model.d_model" in got[0] and "train.lr" in got[1]
    got = errors(cli("eval", world / "runs" / "lm2", "--set", "attention.window={ x = 1 }", "--set",
                     "attention.no_such_key=1", "--set", "eval.sample=3", "--set", "eval.samples=-1", "--set",
                     "nodot=1"))
    assert len(got) == 5 and sum("eval.* keys" in g for g in got) == 2, got
    assert any("did you mean 'samples'" in g for g in got) and any("eval.samples" in g for g in got)
    assert any("nodot" in g for g in got)


def tampered_copy(world, tmp_path, name: str) -> tuple[Path, Path]:
    """A copy of world's lm2 run, and its weights file (to damage in place)."""
    import shutil

    run = tmp_path / name
    shutil.copytree(world / "runs" / "lm2", run)
    return run, next(run.glob("checkpoints/step_*/model.safetensors"))


def test_damaged_weights_are_refused_before_anything_runs(cli, world, tmp_path):
    """Issue 9: every reader of weights verifies them. Bytes changed in place (same size) are caught by the
    sha256, a truncated file by its size even with --no-verify-checksums; one line naming the file, exit 2,
    nothing written, even when the damaged checkpoint is the second model of the comparison."""
    good = world / "runs" / "lm2"
    base = [*sets(world, 'eval.run=["babilong"]', 'eval.tasks=["qa1"]', 'eval.lengths=["0k"]')]
    changed, weights = tampered_copy(world, tmp_path, "changed")
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x01  # the lowest mantissa byte of the last float: finite, same size, another model
    weights.write_bytes(bytes(data))
    msg = one_error(cli("eval", good, changed, *base, "--out", tmp_path / "o1"))
    assert str(weights.parent) in msg and "model.safetensors does not match its recorded sha256" in msg
    assert "--no-verify-checksums" in msg and not (tmp_path / "o1").exists()
    # --no-verify-checksums skips the hash (sizes still agree): the changed weights are evaluated
    r = cli("eval", changed, *base, "--out", tmp_path / "o2", "--no-verify-checksums")
    assert r.code == 0, r.err
    assert read_results(tmp_path / "o2")["command"].endswith("--no-verify-checksums")

    truncated, weights = tampered_copy(world, tmp_path, "truncated")
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:size // 2])
    for flags in ([], ["--no-verify-checksums"]):
        msg = one_error(cli("eval", good, truncated, *base, "--out", tmp_path / "o3", *flags))
        assert str(weights.parent) in msg and f"model.safetensors has {size // 2:,} bytes, the manifest says " \
            f"{size:,}" in msg
        assert not (tmp_path / "o3").exists()


def test_retrieval_is_its_own_row(cli, world, tmp_path):
    pytest.importorskip("bm25s")
    out = tmp_path / "res"
    r = cli("eval", world / "runs" / "lm2", *sets(world, 'eval.run=["babilong"]', 'eval.lengths=["1k"]',
                                                   "eval.retrieval=bm25", "eval.retrieval_k=3"), "--out", out)
    assert r.code == 0, r.err
    b = read_results(out)["babilong"]
    assert b["variants"] == ["lm2", "lm2+bm25-top3"] and b["retrieval"] == {"method": "bm25", "k": 3}
    assert {c["model"] for c in b["cells"]} == {"lm2", "lm2+bm25-top3"}


def test_no_carry_is_its_own_row_for_a_model_with_memory(cli, world, tmp_path):
    """eval.no_carry: the LM2 again with nothing carried across segments, as its own row; the vanilla has no
    memory and no such row; the plain rows are those of a run without the control (the switch is undone)."""
    args = [world / "runs" / "lm2", world / "runs" / "vanilla", *sets(world, 'eval.run=["babilong"]')]
    r = cli("eval", *args, "--set", "eval.no_carry=true", "--out", tmp_path / "cut")
    assert r.code == 0, r.err
    b = read_results(tmp_path / "cut")["babilong"]
    assert b["variants"] == ["lm2", "lm2+no-carry", "vanilla"] and b["no_carry"] is True
    assert cli("eval", *args, "--out", tmp_path / "plain").code == 0
    plain = read_results(tmp_path / "plain")["babilong"]
    outputs = {}
    for name in ("cut", "plain"):
        for p in map(json.loads, (tmp_path / name / "predictions.jsonl").read_text().splitlines()):
            outputs.setdefault(name, {})[(p["model"], p["task"], p["length"], p["index"])] = p["output"]
    assert {k: v for k, v in outputs["cut"].items() if k[0] != "lm2+no-carry"} == outputs["plain"]
    assert [c["model"] for c in plain["cells"]] == [c["model"] for c in b["cells"] if c["model"] != "lm2+no-carry"]
    cut = {k[1:]: v for k, v in outputs["cut"].items() if k[0] == "lm2+no-carry"}
    # the untrained LM2's memory is quiet (out_gate_bias -4) but not silent: cut, some answers change (8 of 24)
    assert 0 < sum(v != outputs["plain"][("lm2", *k)] for k, v in cut.items()) < len(cut)
    assert "lm2+no-carry" in (tmp_path / "cut" / "results.md").read_text()


def test_ctrl_c_keeps_what_finished_marked_incomplete(world, tmp_path, tokenizer):
    """SIGINT during the run: the finished cells stay on disk, marked incomplete, the command exits 2 with one
    line, and nothing (no plot, no 'complete') suggests a finished evaluation."""
    bl = write_babilong(tmp_path / "bl", tasks=("qa1", "qa2"), lengths=("0k", "1k"), samples=150, seed=4)
    out = tmp_path / "res"
    args = [sys.executable, "-m", "lm2cli", "eval", str(world / "runs" / "lm2"), "--out", str(out), "--set",
            f"eval.data={json.dumps(str(bl))}", "--set", 'eval.run=["babilong"]', "--set",
            'eval.tasks=["qa1", "qa2"]', "--set", 'eval.lengths=["0k", "1k"]', "--set", "eval.batch_size=1"]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not (out / "results.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "interrupted by SIGINT" in errors[0] and "marked incomplete" in errors[0]
    results = read_results(out)
    assert results["complete"] is False and results["status"] == "interrupted by SIGINT"
    assert 1 <= len(results["babilong"]["cells"]) < 4
    assert all(c["n"] == 100 for c in results["babilong"]["cells"])  # only whole cells
    assert (out / "results.md").read_text().startswith("# lm2 eval\n\n**INCOMPLETE**")
    assert not list(out.glob("*.png"))
    assert all(row["complete"] == "False" for row in csv.DictReader(open(out / "results.csv")))


def test_without_matplotlib_the_plots_are_skipped_with_the_extra_named(cli, world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = tmp_path / "res"
    r = cli("eval", world / "runs" / "lm2", *sets(world, 'eval.run=["babilong"]', 'eval.tasks=["qa1"]',
                                                   'eval.lengths=["0k"]'), "--out", out)
    assert r.code == 0, r.err
    assert 'plots skipped: they need matplotlib (pip install "lm2[plot]")' in r.err
    assert read_results(out)["complete"] is True and not list(out.glob("*.png"))


def test_fact_annotations_from_a_stranger_are_checked_not_trusted(cli, world, tmp_path):
    """A data file whose rows carry damaged fact_spans / support (wrong types, out-of-range or negative indices,
    bools, nesting): the evaluation still runs (the annotations are optional), those rows are in neither group
    of the support split, and the well-formed rows are."""
    rows = json.loads((world / "bl" / "qa1" / "0k.json").read_text())[:6]
    damage = [{"fact_spans": "0-5", "support": [0]}, {"fact_spans": [[0, 5]], "support": [True]},
              {"fact_spans": [[0, 5]], "support": [7]}, {"fact_spans": [[0, 5]], "support": [-1]},
              {"fact_spans": [[0, 5]], "support": {"0": 1}}, {"fact_spans": [[0, 5], [6, 9]], "support": [1]}]
    (tmp_path / "bl" / "qa1").mkdir(parents=True)
    damaged = [dict(r, **d) for r, d in zip(rows, damage, strict=True)]
    (tmp_path / "bl" / "qa1" / "0k.json").write_text(json.dumps(damaged))
    out = tmp_path / "res"
    r = cli("eval", world / "runs" / "lm2", "--set", f"eval.data={json.dumps(str(tmp_path / 'bl'))}", "--set",
            'eval.run=["babilong"]', "--set", 'eval.tasks=["qa1"]', "--set", 'eval.lengths=["0k"]', "--out", out)
    assert r.code == 0 and "Traceback" not in r.err, r.err
    cell = read_results(out)["babilong"]["cells"][0]
    assert cell["n"] == 6 and cell["by_support"]["last"]["n"] == 1 and "earlier" not in cell["by_support"]
    marks = [json.loads(ln).get("support_last") for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert marks == [None] * 5 + [True]


def test_dtype_is_what_the_runner_gets_and_is_recorded(cli, world, tmp_path):
    """eval.dtype: auto stays exact fp32 on the CPU, bf16 forces autocast (on a GPU, fp32 makes an evaluation
    comparable with a CPU one); the choice is printed and kept in the results' settings."""
    import torch

    from lm2cli.evaluation.models import autocast_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [autocast_dtype(d, c) for d in (cpu, gpu) for c in ("auto", "fp32", "bf16")] == [
        None, None, torch.bfloat16, torch.bfloat16, None, torch.bfloat16]
    base = sets(world, 'eval.run=["babilong"]', 'eval.tasks=["qa1"]', 'eval.lengths=["0k"]')
    for choice, said in (("auto", "fp32"), ("bf16", "bf16 autocast")):
        out = tmp_path / choice
        r = cli("eval", world / "runs" / "lm2", *base, "--set", f'eval.dtype="{choice}"', "--out", out)
        assert r.code == 0, r.err
        assert "(step 1) on " in r.err + r.out and f", {said}\n" in r.err + r.out
        assert read_results(out)["settings"]["dtype"] == choice
    msg = one_error(cli("eval", world / "runs" / "lm2", *base, "--set", 'eval.dtype="fp16"'))
    assert "eval.dtype" in msg and "fp32" in msg and "bf16" in msg
