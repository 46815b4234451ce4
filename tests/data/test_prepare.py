"""`lm2 tokenize`: sources, shards the training side can read, no-op rebuilds, determinism and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lm2cli.data.corpus import BuiltinCorpus
from lm2cli.data.shards import TokenShards
from lm2cli.recipe import load_recipe

FAST = {"tokenizer": {"vocab_size": 320}, "data": {"builtin_stories": 40, "workers": 1, "val_fraction": 0.1}}


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else repr(v)


def write_recipe(tmp_path, name="r.toml", **sections):
    merged = {sec: dict(FAST.get(sec, {})) for sec in set(FAST) | set(sections)}
    for sec, values in sections.items():
        merged[sec].update(values)
    merged.setdefault("data", {}).setdefault("dir", str(tmp_path / "data"))
    lines = []
    for sec, values in merged.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot(directory):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


def test_builtin_corpus_round_trips_through_the_shards(cli, tmp_path):
    recipe_path = write_recipe(tmp_path)
    res = cli("tokenize", recipe_path)
    assert res.code == 0, res.err
    out = tmp_path / "data"
    assert {p.name for p in out.iterdir()} == {"tokenizer.model", "train.bin", "train.idx", "val.bin", "val.idx",
                                               "meta.json", "recipe.toml"}
    recipe = load_recipe(recipe_path)
    shards = TokenShards.for_recipe(recipe)  # what the training loop calls
    meta = shards.meta
    assert meta["vocab_size"] == 320 and meta["dtype"] == "uint16" and meta["document_format"] == "BOS tokens EOS"
    assert meta["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "newline": 5, "answer": 4}
    n_docs = BuiltinCorpus(tuple(recipe.data.builtin_tasks), 40, True, recipe.data.seed).n_documents
    assert shards.num_documents("train") + shards.num_documents("val") == n_docs == 60
    assert shards.num_documents("val") >= 1
    tok = shards.tokenizer()
    corpus = BuiltinCorpus(tuple(recipe.data.builtin_tasks), 40, True, recipe.data.seed)
    texts = {corpus.document(i) for i in range(n_docs)}
    for split in ("train", "val"):
        offsets = shards.doc_offsets(split)
        tokens = shards.split(split)
        assert offsets[-1] == len(tokens) == meta["splits"][split]["tokens"]
        starts = tokens[offsets[:-1].astype(np.int64)]
        ends = tokens[offsets[1:].astype(np.int64) - 1]
        assert (starts == tok.bos_id).all() and (ends == tok.eos_id).all()
        assert (tokens == tok.bos_id).sum() == len(offsets) - 1  # BOS appears only at document starts
        for i in range(min(5, len(offsets) - 1)):
            assert tok.decode(shards.document(split, i)) in texts


def test_what_the_training_loader_does_works(cli, tmp_path):
    """BOS-aligned rows and random windows from the read-only memmaps, as lm2cli.training reads them."""
    recipe_path = write_recipe(tmp_path)
    assert cli("tokenize", recipe_path).code == 0
    shards = TokenShards.for_recipe(load_recipe(recipe_path))
    tokens, offsets = shards.split("train"), shards.doc_offsets("train")
    rng = np.random.default_rng(0)
    seq = 64
    starts = rng.choice(offsets[:-1][offsets[:-1] + seq + 1 <= len(tokens)], size=8)
    batch = np.stack([np.asarray(tokens[s:s + seq + 1], dtype=np.int64) for s in starts])
    assert batch.shape == (8, seq + 1) and (batch[:, 0] == 1).all() and batch.max() < shards.vocab_size
    with pytest.raises(ValueError):
        tokens[0] = 5  # read-only


def test_second_run_is_a_no_op_and_changes_are_detected(cli, tmp_path):
    recipe_path = write_recipe(tmp_path)
    out = tmp_path / "data"
    assert cli("tokenize", recipe_path).code == 0
    before = snapshot(out)
    res = cli("tokenize", recipe_path)
    assert res.code == 0 and "up to date" in res.out and "nothing to do" in res.out
    assert snapshot(out) == before
    res = cli("tokenize", recipe_path, "--set", "data.seed=99")
    assert res.code == 0 and "rebuilding (data.seed (1234 -> 99) changed)" in res.out
    assert snapshot(out)["train.bin"][1] != before["train.bin"][1]
    with pytest.raises(Exception, match="stale"):
        TokenShards.for_recipe(load_recipe(recipe_path))
    res = cli("tokenize", recipe_path, "--set", "data.seed=99", "--force")
    assert res.code == 0 and "rebuilding (--force)" in res.out


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_output_does_not_depend_on_the_number_of_workers(cli, tmp_path, monkeypatch, start):
    one = write_recipe(tmp_path, "one.toml", data={"dir": str(tmp_path / "one"), "workers": 1})
    two = write_recipe(tmp_path, "two.toml", data={"dir": str(tmp_path / "two"), "workers": 2})
    assert cli("tokenize", one).code == 0
    monkeypatch.setenv("LM2_MP_START", start)  # spawn: workers get nothing but what the initializer passes
    res = cli("tokenize", two)
    assert res.code == 0 and "with 2 worker(s)" in res.out
    for name in ("tokenizer.model", "train.bin", "train.idx", "val.bin", "val.idx"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def _files_corpus(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    para = "The lamp flickered in the hall. A moth circled it twice.\n\nIn the morning the river was calm."
    (src / "a.txt").write_text("\n\n".join([para] * 20))
    (src / "sub" / "b.txt").write_text("Snow fell on the roofs. " * 50)
    (src / "c.jsonl").write_text("\n".join(json.dumps({"body": f"Record {i}: the ferry left at dawn."})
                                           for i in range(30)) + "\n")
    (src / "d.json").write_text(json.dumps([{"body": f"Entry {i} about an old clock."} for i in range(20)]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"Parquet row {i} mentions a violin." for i in range(25)]}),
                   src / "e.parquet")
    return src


@pytest.mark.parametrize("unit, expected_txt_docs", [("file", 2), ("paragraph", 41), ("line", 41)])
def test_local_files_through_the_datasets_builders(cli, tmp_path, unit, expected_txt_docs):
    src = _files_corpus(tmp_path)
    recipe_path = write_recipe(tmp_path, data={"source": "files", "files": [str(src)], "text_field": "body",
                                               "text_unit": unit})
    res = cli("tokenize", recipe_path)
    assert res.code == 0, res.err
    shards = TokenShards(tmp_path / "data")
    assert shards.meta["stats"]["documents"] == expected_txt_docs + 30 + 20 + 25
    assert shards.meta["source"]["kind"] == "files" and len(shards.meta["source"]["files"]) == 5
    tok = shards.tokenizer()
    everything = [tok.decode(shards.document(s, i)) for s in ("train", "val")
                  for i in range(shards.num_documents(s))]
    assert "Parquet row 3 mentions a violin." in everything and "Entry 19 about an old clock." in everything


def test_edited_source_file_is_detected(cli, tmp_path):
    src = _files_corpus(tmp_path)
    recipe_path = write_recipe(tmp_path, data={"source": "files", "files": [str(src / "*.jsonl"),
                                                                           str(src / "*.txt")],
                                               "text_field": "body"})
    assert cli("tokenize", recipe_path).code == 0
    with open(src / "c.jsonl", "a") as f:
        f.write(json.dumps({"body": "One more record."}) + "\n")
    res = cli("tokenize", recipe_path)
    assert res.code == 0 and "modified source file" in res.out and "c.jsonl" in res.out


def test_undecodable_bytes_fail_with_file_and_offset_or_are_skipped(cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = "A perfectly fine line of text about the sea.\n" * 40
    (src / "bad.txt").write_bytes(good.encode() + b"caf\xe9 au lait\n" + good.encode())
    (src / "ok.txt").write_text(good)
    recipe_path = write_recipe(tmp_path, data={"source": "files", "files": [str(src)], "text_unit": "line"})
    res = cli("tokenize", recipe_path)
    offset = len(good.encode()) + 3
    assert res.code == 2 and f"bad.txt: byte {offset} is not valid UTF-8" in res.err
    assert res.err.count("\n") == 1 and not (tmp_path / "data" / "meta.json").exists()
    res = cli("tokenize", recipe_path, "--set", 'data.on_decode_error="skip"')
    assert res.code == 0, res.err
    assert "skipped 1 undecodable byte(s)" in res.out
    meta = TokenShards(tmp_path / "data").meta
    assert list(meta["stats"]["skipped_bytes"].values()) == [1]


@pytest.mark.parametrize("files, message", [
    (["missing.txt"], "'missing.txt' not found"),
    (["empty.txt"], "is empty"),
    (["notes.md"], "unsupported type"),
    (["nothing/*.txt"], "matches no"),
])
def test_bad_file_arguments_are_one_line(cli, tmp_path, monkeypatch, files, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.md").write_text("# hi")
    monkeypatch.chdir(tmp_path)
    recipe_path = write_recipe(tmp_path, data={"source": "files", "files": files})
    res = cli("tokenize", recipe_path)
    assert res.code == 2 and message in res.err and res.err.count("\n") == 1 and "Traceback" not in res.err


def test_missing_text_field_names_the_fields(cli, tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": "hello there"}) + "\n")
    recipe_path = write_recipe(tmp_path, data={"source": "files", "files": [str(tmp_path / "rows.jsonl")]})
    res = cli("tokenize", recipe_path)
    assert res.code == 2 and "no field 'text' (fields: content); set data.text_field" in res.err


def test_vocabulary_too_large_leaves_nothing_that_looks_valid(cli, tmp_path):
    recipe_path = write_recipe(tmp_path, tokenizer={"vocab_size": 60000})
    res = cli("tokenize", recipe_path)
    assert res.code == 2 and "tokenizer.vocab_size = 60000 is larger than this corpus supports" in res.err
    assert res.err.count("\n") == 1
    out = tmp_path / "data"
    assert not (out / "meta.json").exists() and not (out / "train.bin").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] if out.exists() else True


def test_failed_rebuild_keeps_the_previous_build_valid(cli, tmp_path):
    recipe_path = write_recipe(tmp_path)
    assert cli("tokenize", recipe_path).code == 0
    before = snapshot(tmp_path / "data")
    res = cli("tokenize", recipe_path, "--set", "tokenizer.vocab_size=60000")
    assert res.code == 2
    assert snapshot(tmp_path / "data") == before
    TokenShards.for_recipe(load_recipe(recipe_path))


def test_reusing_an_existing_tokenizer(cli, tmp_path):
    first = write_recipe(tmp_path, "first.toml", data={"dir": str(tmp_path / "first")})
    assert cli("tokenize", first).code == 0
    model = tmp_path / "first" / "tokenizer.model"
    reuse = write_recipe(tmp_path, "reuse.toml", data={"dir": str(tmp_path / "reuse"), "seed": 5},
                         tokenizer={"path": str(model)})
    res = cli("tokenize", reuse)
    assert res.code == 0 and "reusing" in res.out
    assert (tmp_path / "reuse" / "tokenizer.model").read_bytes() == model.read_bytes()
    bad = write_recipe(tmp_path, "bad.toml", data={"dir": str(tmp_path / "bad")},
                       tokenizer={"path": str(model), "answer_token": "<sep>"})
    res = cli("tokenize", bad)
    assert res.code == 2 and "has no '<sep>' piece" in res.err


def test_two_documents_are_enough_one_is_not(cli, tmp_path):
    (tmp_path / "a.txt").write_text("Only one document here, about lanterns and boats. " * 30)
    (tmp_path / "b.txt").write_text("A second document about bells and rain. " * 30)
    one = write_recipe(tmp_path, "one.toml", data={"source": "files", "files": [str(tmp_path / "a.txt")]},
                       tokenizer={"vocab_size": 300})
    res = cli("tokenize", one)
    assert res.code == 2 and "the corpus has 1 document(s)" in res.err
    two = write_recipe(tmp_path, "two.toml", data={"source": "files", "files": [str(tmp_path / "*.txt")]},
                       tokenizer={"vocab_size": 300})
    assert cli("tokenize", two).code == 0
    shards = TokenShards(tmp_path / "data")
    assert shards.num_documents("train") == 1 and shards.num_documents("val") == 1


class FakeStream:
    def __init__(self, rows, fail_at=None):
        self.rows, self.fail_at = rows, fail_at

    def __iter__(self):
        for i, row in enumerate(self.rows):
            if i == self.fail_at:
                raise ConnectionError("Connection reset by peer")
            yield row


def test_hub_source_with_a_monkeypatched_load_dataset(cli, tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        return FakeStream([{"text": f"Hub document {i} describes a quiet harbour at night."} for i in range(50)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    recipe_path = write_recipe(tmp_path, data={"source": "hub", "hub_name": "someone/corpus", "hub_config": "en",
                                               "hub_split": "train", "hub_streaming": True, "hub_max_docs": 40,
                                               "hub_revision": "abc123"})
    res = cli("tokenize", recipe_path)
    assert res.code == 0, res.err
    name, config, kwargs = calls[0]
    assert (name, config) == ("someone/corpus", "en")
    assert kwargs == {"split": "train", "streaming": True, "revision": "abc123", "trust_remote_code": False}
    meta = TokenShards(tmp_path / "data").meta
    assert meta["stats"]["documents"] == 40 and meta["source"]["revision"] == "abc123"


def test_hub_without_network_is_one_clear_line(cli, tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    recipe_path = write_recipe(tmp_path, data={"source": "hub", "hub_name": "someone/corpus"})
    res = cli("tokenize", recipe_path)
    assert res.code == 2 and res.err.count("\n") == 1
    assert "data.hub_name = 'someone/corpus': the Hugging Face hub cannot be reached" in res.err
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: FakeStream([{"text": "x " * 50}] * 5, 3))
    res = cli("tokenize", recipe_path)
    assert res.code == 2 and "lost the Hugging Face hub while reading row 4" in res.err


def test_hub_source_needs_a_name(cli, tmp_path):
    res = cli("tokenize", write_recipe(tmp_path, data={"source": "hub"}))
    assert res.code == 2 and "needs data.hub_name" in res.err


def test_real_process_with_spawned_workers(lm2_proc, tmp_path):
    """The installed entry point under spawn: workers re-import lm2cli.__main__ without re-running the CLI."""
    recipe_path = write_recipe(tmp_path, data={"workers": 2})
    proc = lm2_proc("tokenize", recipe_path, env={"LM2_MP_START": "spawn"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "with 2 worker(s)" in proc.stdout
    proc = lm2_proc("tokenize", recipe_path, "--set", "tokenizer.vocab_size=60000", timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: tokenizer.vocab_size = 60000")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_babilong_command_options(cli, tmp_path):
    from pathlib import Path

    from lm2cli.recipe import recipe_from_toml

    small = Path(__file__).resolve().parents[2] / "recipes" / "small.toml"
    res = cli("babilong", small, "--print-recipe", "--out", tmp_path / "bl", "--set", "babilong.margin=20")
    assert res.code == 0
    r = recipe_from_toml(res.out)
    assert r.babilong.dir == str(tmp_path / "bl") and r.babilong.margin == 20
    res = cli("babilong", "--help")
    assert res.code == 0 and "--babi-text" in res.out


def test_small_sources_are_hashed_large_ones_stat(cli, tmp_path, monkeypatch):
    import lm2cli.data.fingerprint as fp

    (tmp_path / "a.txt").write_text("The ferry left at dawn and came back at dusk. " * 40)
    (tmp_path / "b.txt").write_text("Bells rang over the harbour all afternoon long. " * 40)
    recipe_path = write_recipe(tmp_path, data={"source": "files", "files": [str(tmp_path / "*.txt")]},
                               tokenizer={"vocab_size": 300})
    assert cli("tokenize", recipe_path).code == 0
    os.utime(tmp_path / "a.txt", ns=(1, 1))  # same content, new modification time
    assert "up to date" in cli("tokenize", recipe_path).out
    monkeypatch.setattr(fp, "CONTENT_HASH_LIMIT", 10)  # now the corpus counts as large: size + mtime
    res = cli("tokenize", recipe_path)
    assert "rebuilding" in res.out  # the signature changed form
    assert "up to date" in cli("tokenize", recipe_path).out
    os.utime(tmp_path / "b.txt", ns=(2, 2))
    assert "modified source file" in cli("tokenize", recipe_path).out


def test_builtin_repeat_appends_a_verbatim_copy_to_its_share_of_documents():
    tasks = ("qa1", "qa2")
    plain = BuiltinCorpus(tasks, 300, True, 1234)
    repeating = BuiltinCorpus(tasks, 300, True, 1234, repeat=0.3)
    copied = 0
    for i in range(plain.n_documents):
        original, doc = plain.document(i), repeating.document(i)
        if doc != original:
            assert doc == f"{original}\n{original}"
            copied += 1
        assert "\n" not in original or i % 3 == 2  # stories are one line (filler has paragraphs)
    assert abs(copied / plain.n_documents - 0.3) < 0.06
    assert [repeating.document(i) for i in range(20)] == [repeating.document(i) for i in range(20)]
    assert all(BuiltinCorpus(tasks, 300, True, 1234, repeat=1.0).repeated(i) for i in range(50))


def test_changing_builtin_repeat_makes_the_shards_stale(cli, tmp_path):
    recipe_path = write_recipe(tmp_path)
    assert cli("tokenize", recipe_path).code == 0
    res = cli("tokenize", recipe_path, "--set", "data.builtin_repeat=0.5")
    assert res.code == 0 and "data.builtin_repeat (0.0 -> 0.5)" in res.out
