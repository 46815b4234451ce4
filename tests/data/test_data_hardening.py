"""Data commands under careless or hostile input (issue 9): output directories that are files, lie under a file,
cannot be written or belong to someone else; leftovers of killed runs; crafted meta.json; binary haystack;
datasets' own log lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .test_babilong import babilong_recipe
from .test_prepare import write_recipe

UNWRITABLE = Path("/sys/lm2-test-output")  # refuses mkdir even for root (permission bits do not stop root)


def one_error(res, code=2) -> str:
    lines = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert res.code == code and len(lines) == 1 and "Traceback" not in res.err, (res.code, res.err)
    return lines[0]


def command_args(kind: str, tmp_path: Path, tokenizer, out) -> list:
    if kind == "tokenize":
        return ["tokenize", write_recipe(tmp_path), "--out", out]
    recipe = babilong_recipe(tmp_path, tokenizer, tasks=["qa1"], lengths=["0k"])
    if kind == "babilong":
        return ["babilong", recipe, "--out", out]
    return ["babilong", recipe, "--babi-text", out, "--train-questions", "5", "--test-questions", "5"]


KINDS = ["tokenize", "babilong", "babi-text"]


@pytest.mark.parametrize("kind", KINDS)
def test_output_that_is_a_file_or_under_one_or_unwritable(cli, tmp_path, small_tokenizer, kind):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert "is a file, not a directory" in one_error(cli(*command_args(kind, tmp_path, small_tokenizer, afile)))
    line = one_error(cli(*command_args(kind, tmp_path, small_tokenizer, afile / "sub")))
    assert f"{afile} is a file, so no directory can be created under it" in line
    if UNWRITABLE.parent.is_dir():
        assert "cannot write there" in one_error(cli(*command_args(kind, tmp_path, small_tokenizer, UNWRITABLE)))
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("kind", KINDS)
def test_a_directory_of_someone_elses_files_is_refused_and_left_alone(cli, tmp_path, small_tokenizer, kind):
    out = tmp_path / "theirs"
    (out / "qa1").mkdir(parents=True)
    files = {out / "qa1" / "0k.json": "[]", out / "qa1_single-supporting-fact_train.txt": "1 Mary went home.\n",
             out / "train.bin": "x"}
    for path, text in files.items():
        path.write_text(text)
    line = one_error(cli(*command_args(kind, tmp_path, small_tokenizer, out)))
    assert f"{out} is not empty and is not an lm2" in line and "qa1" in line
    assert all(path.read_text() == text for path, text in files.items())


@pytest.mark.parametrize("kind", KINDS)
def test_rerunning_into_lm2s_own_directory_works(cli, tmp_path, small_tokenizer, kind):
    out = tmp_path / "out"
    assert cli(*command_args(kind, tmp_path, small_tokenizer, out)).code == 0
    res = cli(*command_args(kind, tmp_path, small_tokenizer, out))
    assert res.code == 0, res.err


def test_one_kind_of_lm2_directory_is_not_taken_for_another(cli, tmp_path, small_tokenizer):
    data = tmp_path / "data"
    assert cli(*command_args("tokenize", tmp_path, small_tokenizer, data)).code == 0
    line = one_error(cli(*command_args("babilong", tmp_path, small_tokenizer, data)))
    assert "is an lm2 token-shard directory, not a BABILong directory" in line
    assert (data / "meta.json").is_file()  # (the old code deleted it as "its" previous build)


def test_a_killed_tokenize_leaves_nothing_for_good(cli, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    leftover = out / ".train.bin.k2j4h1xz.tmp"
    leftover.write_bytes(b"\0" * 1000)  # what a kill during encoding leaves behind
    res = cli("tokenize", write_recipe(tmp_path), "--out", out)
    assert res.code == 0, res.err
    assert not leftover.exists() and "removed 1 temporary file(s) an interrupted run left" in res.out


def test_a_killed_babilong_build_is_recognised_and_cleaned(cli, tmp_path, small_tokenizer):
    out = tmp_path / "bl"
    args = command_args("babilong", tmp_path, small_tokenizer, out)
    assert cli(*args).code == 0
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({"format": "babilong", "lm2_version": meta["lm2_version"],
                                               "complete": False, "files": ["qa1/0k.json"]}))  # as a kill leaves it
    (out / "qa1" / ".0k.json.abcd1234.tmp").write_text("half")
    assert cli(*args).code == 0
    assert json.loads((out / "meta.json").read_text())["fingerprint"] and not list(out.glob("qa1/.*.tmp"))


def test_a_crafted_babilong_meta_cannot_delete_files_elsewhere(cli, tmp_path, small_tokenizer):
    out = tmp_path / "bl"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"format": "babilong", "lm2_version": "0", "files": ["../victim.txt"]}))
    assert cli(*command_args("babilong", tmp_path, small_tokenizer, out)).code == 0
    assert victim.read_text() == "keep me"


def test_binary_haystack_is_refused(cli, tmp_path, small_tokenizer):
    books = tmp_path / "books"
    books.mkdir()
    (books / "book.txt").write_bytes(bytes(range(256)) * 400)
    recipe = babilong_recipe(tmp_path, small_tokenizer, tasks=["qa1"], lengths=["1k"], haystack=str(books))
    line = one_error(cli("babilong", recipe))
    assert "book.txt is not plain text (a NUL byte at offset 0)" in line


def test_datasets_log_lines_do_not_lead_our_message(tmp_path, lm2_proc):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{broken\n')
    res = lm2_proc("tokenize", write_recipe(tmp_path, data={"source": "files", "files": [str(bad)]}),
                   env={"HF_DATASETS_OFFLINE": "1"})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr  # was: datasets' "Failed to load JSON ..." first
    assert lines[0].startswith("error: ") and "bad.jsonl: cannot read it as json" in lines[0]
