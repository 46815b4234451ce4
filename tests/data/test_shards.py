"""TokenShards: the read-only view the training loop uses, and its refusal of missing or stale shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lm2cli.data.fingerprint import fingerprint_inputs
from lm2cli.data.shards import ShardWriter, TokenShards, build_meta, token_dtype
from lm2cli.errors import Lm2Error
from lm2cli.fileio import atomic_write_json
from lm2cli.recipe import load_recipe

from .conftest import varied_sentences


def write_shards(out_dir, tokenizer, recipe, docs_by_split):
    """What `lm2 tokenize` does after training the tokenizer, minus the corpus and the parallelism."""
    tokenizer.save(out_dir / "tokenizer.model")
    writers = {}
    for split, docs in docs_by_split.items():
        w = ShardWriter(out_dir, split, token_dtype(tokenizer.vocab_size))
        for doc in docs:
            w.add(np.array(tokenizer.encode(doc, bos=True, eos=True)))
        w.commit()
        writers[split] = w
    meta = build_meta(tokenizer, writers, fingerprint_inputs(recipe), {"kind": "test"})
    atomic_write_json(out_dir / "meta.json", meta)


@pytest.fixture
def built(tmp_path, small_tokenizer):
    recipe = load_recipe(None, [f"data.dir='{tmp_path}'"])
    docs = {"train": varied_sentences(40, seed=1), "val": varied_sentences(5, seed=2)}
    write_shards(tmp_path, small_tokenizer, recipe, docs)
    return tmp_path, recipe, docs


def test_splits_are_readonly_memmaps_with_document_offsets(built, small_tokenizer):
    out, recipe, docs = built
    shards = TokenShards(out)
    train = shards.split("train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and not train.flags.writeable
    offsets = shards.doc_offsets("train")
    assert len(offsets) == len(docs["train"]) + 1 and offsets[0] == 0 and offsets[-1] == len(train)
    assert shards.num_tokens("train") == len(train) and shards.num_documents("val") == 5
    for i, text in enumerate(docs["train"]):
        doc = shards.document("train", i)
        assert doc[0] == small_tokenizer.bos_id and doc[-1] == small_tokenizer.eos_id
        assert small_tokenizer.decode(doc) == text
    assert shards.tokenizer().sha256 == small_tokenizer.sha256
    assert shards.meta["special_ids"]["answer"] == 4 and shards.vocab_size == 400
    shards.check_matches(recipe)
    assert TokenShards.for_recipe(recipe).num_documents("train") == 40


def test_missing_shards_say_run_tokenize(tmp_path):
    recipe = load_recipe(None, [f"data.dir='{tmp_path / 'nothing'}'"])
    with pytest.raises(Lm2Error, match=r"run `lm2 tokenize RECIPE` first"):
        TokenShards.for_recipe(recipe)


def test_stale_shards_name_the_changed_key(built):
    out, _, _ = built
    changed = load_recipe(None, [f"data.dir='{out}'", "data.builtin_stories=7"])
    with pytest.raises(Lm2Error, match=r"stale .*data.builtin_stories \(20000 -> 7\).*lm2 tokenize"):
        TokenShards(out).check_matches(changed)
    other_vocab = load_recipe(None, [f"data.dir='{out}'", "tokenizer.vocab_size=512"])
    with pytest.raises(Lm2Error, match=r"tokenizer.vocab_size \(4096 -> 512\)"):
        TokenShards(out).check_matches(other_vocab)


def test_irrelevant_keys_do_not_make_shards_stale(built):
    out, _, _ = built
    same = load_recipe(None, [f"data.dir='{out}'", "data.workers=7", "data.hub_name='x/y'", "train.lr=0.5"])
    TokenShards(out).check_matches(same)


def test_model_vocab_size_must_match(built):
    out, _, _ = built
    recipe = load_recipe(None, [f"data.dir='{out}'", "model.vocab_size=1000"])
    with pytest.raises(Lm2Error, match=r"model.vocab_size = 1000 .* vocabulary of 400"):
        TokenShards(out).check_matches(recipe)
    TokenShards(out).check_matches(load_recipe(None, [f"data.dir='{out}'", "model.vocab_size=400"]))


def test_truncated_or_tampered_files_are_refused(built):
    out, recipe, _ = built
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(Lm2Error, match=r"train.bin is incomplete or corrupt"):
        TokenShards(out).check_matches(recipe)
    (out / "train.bin").write_bytes(data)
    (out / "tokenizer.model").write_bytes((out / "tokenizer.model").read_bytes() + b"\x00")
    with pytest.raises(Lm2Error):
        TokenShards(out).tokenizer()
    meta = json.loads((out / "meta.json").read_text())
    meta["format"] = "something-else"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(Lm2Error, match="not an lm2 token-shard directory"):
        TokenShards(out)


def test_writer_abort_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path, "train", np.dtype("<u2"))
    w.add(np.array([1, 5, 2]))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_large_vocabularies_use_uint32():
    assert token_dtype(65_535) == np.uint16 and token_dtype(65_536) == np.uint32
