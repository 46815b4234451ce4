"""`lm2 inspect-memory` end to end on tiny saved runs: files written and re-read, BABILong facts, RMT,
recipes as targets, and one clear line for every bad option."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lm2cli.errors import Lm2Error
from lm2cli.inspection import store
from lm2cli.inspection.inputs import BabilongSpec, babilong_input

from .conftest import FACTS, babilong_rows

PROMPT = ("Mary moved to the bathroom. John went to the hallway. Mary got the football there. "
          "Sandra journeyed to the garden. Daniel took the apple there. Where is the football?")


def test_figures_tensors_and_summary_are_written_and_reread(cli, runs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    res = cli("inspect-memory", runs["lm2"], "--prompt", PROMPT * 2, "--generate", "40", "--top-tokens", "6",
              "--layer", "1", "--out", out)  # one block: figures are the slow part
    assert res.code == 0, res.err
    assert "g_in" in res.out and f"written to {out}/" in res.out
    names = {p.name for p in out.iterdir()}
    assert {"read_L1.png", "write_L1.png", "gates_L1.png", "before_after_L1.png"} <= names
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    ins = store.load(out)
    index = json.loads((out / "index.json").read_text())
    tensors = store.flat_tensors(ins)
    assert set(index["tensors"]) == set(tensors)
    for key, meta in index["tensors"].items():
        assert list(tensors[key].shape) == meta["shape"] and meta["meaning"]
    read = ins.layers[1]["read"]
    assert read.shape == (len(ins.tokens), 8) and len(ins.tokens) == ins.n_prompt + 40
    assert torch.allclose(read.sum(-1), torch.ones(len(read)), atol=1e-5)
    assert ins.reread[1]["before"].shape == (len(ins.heatmap_rows[1]), 8)
    assert not torch.equal(ins.reread[1]["before"], ins.reread[1]["after"])  # generation wrote the memory
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated_tokens"] == 40 and summary["layers"]["1"]["segments"]
    slots = [json.loads(line) for line in (out / "slots.jsonl").read_text().splitlines()]
    assert [(r["layer"], r["slot"]) for r in slots] == [(1, s) for s in range(8)]
    assert all(len(r["top_written"]) == 6 and "[[" in r["top_written"][0]["context"] for r in slots)
    assert sorted(index["files"]) == sorted(names - {"index.json"})
    # a rerun into the same folder with one block leaves no figure of the other behind
    from lm2cli.inspection import figures

    monkeypatch.setattr(figures, "have_matplotlib", lambda: False)
    assert cli("inspect-memory", runs["lm2"], "--prompt", PROMPT, "--layer", "0", "--out", out).code == 0
    assert not list(out.glob("*.png")) and store.load(out).layers.keys() == {0}


def test_without_matplotlib_the_tensors_and_summary_are_still_written(cli, runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError, as uninstalled
    res = cli("inspect-memory", runs["lm2"], "--prompt", PROMPT, "--out", tmp_path / "o", "--json")
    assert res.code == 0, res.err
    assert "pip install 'lm2[plot]'" in res.err and "plot extra" in res.err
    assert not list((tmp_path / "o").glob("*.png"))
    assert {"tensors.safetensors", "index.json", "summary.json", "slots.jsonl"} <= {
        p.name for p in (tmp_path / "o").iterdir()}
    summary = json.loads(res.out)
    assert summary["arch"] == "lm2" and summary["out"] == str(tmp_path / "o")


def test_babilong_row_reports_the_fact_attention_ratio(cli, runs, babilong_dir, no_figures):
    res = cli("inspect-memory", runs["lm2"], "--babilong", f"{babilong_dir}:qa2:1k:1", "--json")
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    out = runs["lm2"] / "inspect" / "qa2-1k-1"  # the default: <run>/inspect/<name>
    assert summary["out"] == str(out) and summary["target"] == "office"
    assert summary["facts"] == "4 facts from the row's fact_spans"
    facts = summary["layers"]["0"]["facts"]
    assert facts["ratio"] > 0 and len(facts["slot_ratio"]) == 8
    assert 0 <= facts.get("answer_read_on_fact_slots", 0) <= 1
    assert summary["layers"]["0"]["supporting_facts"]["fact_tokens_written"] < facts["fact_tokens_written"]
    ins = store.load(out)
    marked = "".join(p for p, fact in zip(ins.pieces, ins.fact_mask, strict=False) if fact)
    assert marked.replace(" ", "") == "".join(FACTS).replace(" ", "")  # the marked tokens are the facts
    assert ins.answer_pos == ins.n_prompt - 1


def test_hub_rows_without_spans_find_the_facts_by_their_grammar(tokenizer, tmp_path):
    from lm2cli.inspection.inputs import BabilongSpec, babilong_input

    row = babilong_rows(tokenizer, n=1)[0]
    hub_row = {k: row[k] for k in ("input", "question", "target")}
    (tmp_path / "qa2").mkdir()
    (tmp_path / "qa2" / "1k.json").write_text(json.dumps([hub_row]))
    exact = babilong_input(BabilongSpec(str(tmp_path), "qa2", "1k"), tokenizer, "x")
    assert "matching bAbI statements (4 found)" in exact.facts_note and exact.support_mask is None
    with_spans = tmp_path / "spans"
    (with_spans / "qa2").mkdir(parents=True)
    (with_spans / "qa2" / "1k.json").write_text(json.dumps([row]))
    recorded = babilong_input(BabilongSpec(str(with_spans), "qa2", "1k"), tokenizer, "x")
    assert exact.fact_mask == recorded.fact_mask and sum(recorded.fact_mask) > 20


def test_babilong_text_is_the_fine_tuning_prompt(tokenizer, babilong_dir):
    """Inspection reads a row as fine-tuning and eval give it to the model (lm2cli.data.examples), with the
    answer position on the separator and each fact token's span in that prompt."""
    from lm2cli.data.examples import babilong_context, babilong_example

    rows = babilong_rows(tokenizer)
    for index, row in enumerate(rows[:2]):
        text = babilong_input(BabilongSpec(str(babilong_dir), "qa2", "1k", index), tokenizer, "x")
        example = babilong_example(tokenizer, row)
        assert text.ids == example.prompt and text.target == example.text_answer
        assert text.ids[text.answer_pos] == tokenizer.answer_id
        context = babilong_context(row)
        fact_text = "".join(tokenizer.decode([t]) for t, f in zip(text.ids, text.fact_mask, strict=True) if f)
        assert fact_text.replace(" ", "") == "".join(FACTS).replace(" ", "")
        assert all(fact.replace(" ", "") in context.replace(" ", "") for fact in FACTS)


def test_rmt_run_shows_its_memory_tokens(cli, runs, tmp_path):
    res = cli("inspect-memory", runs["rmt"], "--prompt", PROMPT, "--layer", "1", "--heads", "0",
              "--out", tmp_path / "r", "--json")
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    assert list(summary["layers"]) == ["1"] and summary["heads"] == 0
    assert sum(summary["layers"]["1"]["write_split"].values()) == pytest.approx(1, abs=1e-3)
    assert len(summary["memory_tokens"]["change"]) == summary["prompt_tokens"] // 32
    assert {"read_L1.png", "write_L1.png", "memory.png"} <= {p.name for p in (tmp_path / "r").iterdir()}


def test_vanilla_is_refused_in_one_line(cli, runs):
    res = cli("inspect-memory", runs["vanilla"], "--prompt", PROMPT)
    assert res.code == 2
    assert res.err.splitlines() == [f"error: {runs['vanilla']}/checkpoints/step_00000010: model.arch = vanilla "
                                    f"has no memory to inspect; inspect-memory reads lm2 and rmt runs"]


def test_an_associative_bank_is_taken_apart(cli, tokenizer, babilong_dir, tmp_path):
    """memory.write = "delta": no slots; per block the write strengths, the answer's read split over the written
    tokens (shares summing to 1), fact numbers, one explainer record per head and one figure per block."""
    from .conftest import save_run

    run = save_run(tmp_path / "delta", tokenizer, "lm2", "memory.write=delta")
    out = tmp_path / "o"
    res = cli("inspect-memory", run, "--babilong", f"{babilong_dir}:qa2:1k:1", "--layer", "1", "--top-tokens", "4",
              "--generate", "3", "--out", out)
    assert res.code == 0, res.err
    assert "associative memory" in res.out and "read on facts (even)" in res.out
    entry = json.loads((out / "summary.json").read_text())["layers"]["1"]
    ins = store.load(out)
    assert entry["memory"] == "associative" and entry["read"]["position"] == ins.answer_pos
    held = entry["read"]["tokens_held"]
    assert held == ins.answer_pos // 32 * 32 > 0  # tiny recipe: segments of 32 tokens
    assert len(entry["read"]["top"]) == 4
    for key in ("facts", "supporting_facts"):
        numbers = entry[key]
        assert numbers["write_ratio"] > 0 and -1 <= numbers["answer_read_on_facts"] <= 1
        assert 0 < numbers["answer_read_even"] < 1
    assert entry["supporting_facts"]["fact_tokens_written"] < entry["facts"]["fact_tokens_written"]
    # per fact: the shares of its tokens, summing to the facts' share; the supporting ones marked
    per_fact = entry["per_fact"]
    assert [f["fact"] for f in per_fact] == sorted({i for i in ins.fact_index[:held] if i >= 0})
    assert sum(f["share"] for f in per_fact) == pytest.approx(entry["facts"]["answer_read_on_facts"], abs=1e-3)
    assert sum(f["share"] for f in per_fact if f["supporting"]) == pytest.approx(
        entry["supporting_facts"]["answer_read_on_facts"], abs=1e-3)
    row = json.loads((babilong_dir / "qa2" / "1k.json").read_text())[1]
    assert {f["fact"] for f in per_fact if f["supporting"]} == set(row["support"]) & {f["fact"] for f in per_fact}
    for f in per_fact:  # each fact's text is the row's fact at that number
        start, end = row["fact_spans"][f["fact"]]
        assert f["text"] == row["input"][start:end]
    shown = [line for line in res.out.splitlines() if line.startswith("block 1 answer read per fact: ")]
    assert len(shown) == 1 and shown[0].count("#") == min(4, len(per_fact))
    tensors = ins.layers[1]
    # every fed token read (a generated end-of-text token is not fed back)
    assert tensors["query"].shape[1:] == (2, 32) and ins.n_prompt < len(tensors["query"]) <= len(ins.tokens)
    assert tensors["beta"].shape[1] == 2
    assert tensors["write_key"].shape[0] == tensors["beta"].shape[0] == len(tensors["write_end"]) * 32
    records = [json.loads(line) for line in (out / "slots.jsonl").read_text().splitlines()]
    assert [(r["layer"], r["head"]) for r in records] == [(1, 0), (1, 1)]
    assert all(len(r["top_written"]) == len(r["top_read"]) == 4 for r in records)
    png = out / "associative_L1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert {p.name for p in out.glob("*.png")} == {"associative_L1.png"}
    assert_fact_index_is_checked_on_load(out, ins)
    # --read-at takes another position apart (here the first token of the last segment: 32 tokens held)
    res = cli("inspect-memory", run, "--prompt", PROMPT, "--read-at", "64", "--json", "--out", tmp_path / "p")
    assert res.code == 0, res.err
    read = json.loads(res.out)["layers"]["0"]["read"]
    assert read["position"] == 64 and read["tokens_held"] == 64
    assert store.load(tmp_path / "p").read_at == 64
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    for bad in ("64", -1, 10**6, 1.5):  # a stranger's index: refused in one line, not a crash in the analysis
        (tmp_path / "p" / "index.json").write_text(json.dumps(index | {"read_at": bad}))
        with pytest.raises(Lm2Error, match="read_at = .*: expected a text position 0"):
            store.load(tmp_path / "p")
    for value, message in (("-1", "--read-at -1: expected a text position, 0 (the BOS token) or more"),
                           ("999", "--read-at 999: --prompt has ")):
        res = cli("inspect-memory", run, "--prompt", PROMPT, "--read-at", value)
        assert res.code == 2 and len(res.err.splitlines()) == 1 and message in res.err, res.err
    res = cli("inspect-memory", run, "--prompt", "Mary went", "--slots", "0:4")
    assert res.code == 2 and res.err.splitlines() == [
        'error: --slots 0:4: memory.write = "delta" keeps an associative matrix, not slots; its reads are taken '
        'apart token by token (leave out --slots)']


def assert_fact_index_is_checked_on_load(out, ins) -> None:
    """A stranger's tensors file with a fact index that is not one integer >= -1 per text token agreeing with the
    fact mask: refused in one line naming the file, not a crash in the analysis."""
    from safetensors.torch import load_file, save_file

    path = out / store.TENSORS
    good = load_file(path)
    index = good["fact_index"]
    changed = index.clone()
    changed[changed.argmax()] = -1  # a fact token no longer in a fact
    for bad in (index.float(), index[None], torch.full((ins.n_prompt + 1,), -1, dtype=torch.int32),
                index - 2, changed):
        save_file(good | {"fact_index": bad.contiguous()}, path)
        with pytest.raises(Lm2Error, match="tensors.safetensors: fact_index should be"):
            store.load(out)
    save_file(good, path)
    assert store.load(out).fact_index == ins.fact_index


def test_a_recipe_names_its_run(cli, runs, tmp_path, no_figures):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[output]\ndir = "{runs["lm2"]}"\n')
    res = cli("inspect-memory", recipe, "--prompt", "Mary went", "--json", "--out", tmp_path / "o")
    assert res.code == 0, res.err
    assert json.loads(res.out)["checkpoint"] == str(runs["lm2"] / "checkpoints" / "step_00000010")
    recipe.write_text(f'[output]\ndir = "{tmp_path / "none"}"\n')
    res = cli("inspect-memory", recipe, "--prompt", "Mary went")
    assert res.code == 2 and len(res.err.splitlines()) == 1 and "does not exist" in res.err


def test_no_argument_is_the_default_run_and_a_checkpoint_writes_into_its_run(cli, runs, tmp_path, monkeypatch,
                                                                           no_figures):
    """The shared resolver's other forms: nothing (runs/small here, where recipes/small.toml trains) and a
    checkpoint directory itself; the default output goes into the run either way."""
    import shutil

    monkeypatch.chdir(tmp_path)
    res = cli("inspect-memory", "--prompt", "Mary went")
    assert res.code == 2 and res.err.splitlines() == [
        "error: no run given and the default run directory runs/small/ does not exist here; train one first with "
        "`lm2 pretrain recipes/small.toml`, or pass a run or checkpoint directory or a recipe file"]
    shutil.copytree(runs["lm2"], tmp_path / "runs" / "small")
    res = cli("inspect-memory", "--prompt", "Mary went", "--json")
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    assert summary["checkpoint"] == str(Path("runs/small/checkpoints/step_00000010"))
    assert Path(summary["out"]).parent == Path("runs/small/inspect")
    res = cli("inspect-memory", runs["lm2"] / "checkpoints" / "step_00000010", "--file", _story(tmp_path), "--json")
    assert res.code == 0, res.err
    assert Path(json.loads(res.out)["out"]) == runs["lm2"] / "inspect" / "story"


def _story(directory: Path) -> Path:
    story = directory / "story.txt"
    story.write_text(PROMPT, encoding="utf-8")
    return story


@pytest.mark.parametrize("content,message", [
    (b"\xff\xfe[output]", "not UTF-8"),
    (b"[output\ndir = 1", "r.toml"),
    (b"[output]\ndir = 3\n", "output.dir"),
    (b"[outptu]\ndir = 'x'\n", "outptu"),
])
def test_a_bad_recipe_as_target_is_one_line(cli, tmp_path, content, message):
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(content)
    res = cli("inspect-memory", recipe, "--prompt", "Mary")
    assert res.code == 2 and len(res.err.splitlines()) == 1 and res.err.startswith("error: "), res.err
    assert message in res.err and "Traceback" not in res.err


@pytest.mark.parametrize("args,message", [
    (["--layer", "x"], "--layer x: expected a block index"),
    (["--layer", "5"], "--layer 5: not one of this model's memory blocks (0, 1)"),
    (["--slots", "5:2"], "--slots 5:2: expected A:B with A < B"),
    (["--slots", "0"], "--slots 0: expected A:B"),
    (["--slots", "0:9"], "--slots 0:9: the model has 8 slots"),
    (["--heads", "2"], "--heads 2: the memory attention has 2 heads (0 ... 1)"),
    (["--heads", "median"], "--heads median: expected mean, max or a head index"),
    (["--generate", "-1"], "--generate -1: expected 0 or more"),
    (["--babilong", "qa1:1k"], "--babilong 'qa1:1k': expected DIR_OR_HUB:TASK:LENGTH[:INDEX]"),
    (["--babilong", "d:quiz:1k"], "task 'quiz' should be qa1 ... qa20"),
    (["--babilong", "d:qa1:long"], "length 'long' should look like 0k, 1k"),
    (["--babilong", "{dir}:qa2:1k:7"], "index 7 is out of range; qa2 at 1k has 3 rows (0 ... 2)"),
    (["--babilong", "{dir}:qa9:1k"], "no qa9/1k.json"),
    (["--file", "missing.txt"], "--file missing.txt: not found"),
    ([], "no text given: use --prompt TEXT, --file PATH or --babilong"),
    (["--file", "x.txt", "--babilong", "d:qa1:1k"], "give one text, not --file and --babilong"),
])
def test_bad_options_are_one_line_and_exit_2(cli, runs, babilong_dir, args, message):
    args = [a.replace("{dir}", str(babilong_dir)) for a in args]
    text = [] if any(a in args for a in ("--babilong", "--file")) or not args else ["--prompt", PROMPT]
    res = cli("inspect-memory", runs["lm2"], *text, *args)
    assert res.code == 2
    assert len(res.err.splitlines()) == 1 and res.err.startswith("error: ") and message in res.err, res.err


def test_missing_run_is_one_line(cli, tmp_path):
    res = cli("inspect-memory", tmp_path / "nowhere", "--prompt", "Mary")
    assert res.code == 2 and len(res.err.splitlines()) == 1 and "nowhere" in res.err


def test_default_name_of_a_file_is_its_stem(cli, runs, tmp_path, no_figures):
    res = cli("inspect-memory", runs["lm2"], "--file", _story(tmp_path), "--json")
    assert res.code == 0, res.err
    assert Path(json.loads(res.out)["out"]) == runs["lm2"] / "inspect" / "story"
