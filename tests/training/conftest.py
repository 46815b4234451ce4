"""Fixtures for the training tests: the tiny recipe's corpus tokenized once per session and tiny-recipe
overrides (the single compute thread is set for the whole suite in tests/conftest.py)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.toml"
PEOPLE = ["Mary", "John", "Sandra", "Daniel", "Bill", "Fred"]
ROOMS = ["kitchen", "garden", "office", "hallway", "bedroom", "bathroom"]
VERBS = ["went to", "moved to", "travelled to", "journeyed to"]

# Shrinks recipes/tiny.toml further: a 400-piece vocabulary and a 2-layer d=32 LM2 with memory in both
# blocks, 64-token rows of two 32-token segments. Steps, eval and save cadence are set per test.
SMALL_MODEL = ["tokenizer.vocab_size=400", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
               "memory.slots=4", "memory.heads=2", "memory.segment_len=32", "train.seq_len=64",
               "train.batch_size=4", "train.lr=0.01", "train.min_lr=0.001", "train.warmup_steps=2",
               "train.eval_batches=2", "train.log_every=1"]


def story(rng: random.Random) -> str:
    where = {}
    lines = []
    for _ in range(rng.randint(3, 8)):
        p, r = rng.choice(PEOPLE), rng.choice(ROOMS)
        where[p] = r
        lines.append(f"{p} {rng.choice(VERBS)} the {r}.")
    p = rng.choice(sorted(where))
    lines.append(f"Where is {p}? {where[p]}")
    return "\n".join(lines)


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [story(rng) for _ in range(n)]


def build_shards(out_dir: Path, recipe, train_docs: list[str], val_docs: list[str], tok=None):
    """Train a tokenizer (unless given) and write shards as `lm2 tokenize` does, with the data module's own
    writers."""
    from lm2cli.data.fingerprint import fingerprint_inputs
    from lm2cli.data.shards import ShardWriter, build_meta, token_dtype
    from lm2cli.data.tokenizer import train_tokenizer
    from lm2cli.fileio import atomic_write_json

    t = recipe.tokenizer
    lines = [line for doc in train_docs for line in doc.split("\n")]
    if tok is None:
        tok = train_tokenizer(lines, model_type=t.type, vocab_size=t.vocab_size, byte_fallback=t.byte_fallback,
                              character_coverage=1.0, sample_sentences=t.sample_sentences,
                              answer_token=t.answer_token, extra_symbols=t.extra_symbols, seed=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(out_dir / "tokenizer.model")
    writers = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        w = ShardWriter(out_dir, split, token_dtype(tok.vocab_size))
        for doc in docs:
            w.add(np.array(tok.encode(doc, bos=True, eos=True)))
        w.commit()
        writers[split] = w
    atomic_write_json(out_dir / "meta.json", build_meta(tok, writers, fingerprint_inputs(recipe), {"kind": "test"}))
    return tok


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """`lm2 tokenize recipes/tiny.toml` (built-in corpus) with a 400-piece vocabulary.

    With LM2_TEST_DATA_CACHE=DIR the result is kept in DIR and reused by later sessions: the mutation-testing
    command sets it, since it starts one pytest session per mutant and `lm2 tokenize` is not among the mutated
    modules. Never set it while changing the data pipeline.
    """
    from lm2cli.cli import run

    cache = os.environ.get("LM2_TEST_DATA_CACHE")
    if cache and (Path(cache) / "data-tiny" / "meta.json").is_file():
        return Path(cache) / "data-tiny"
    out = tmp_path_factory.mktemp("data-tiny")
    assert run(["tokenize", str(TINY), "--set", "tokenizer.vocab_size=400", "--out", str(out)]) == 0
    if cache:  # publish atomically: parallel sessions may race, and a partial directory must never be used
        Path(cache).mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=cache))
        shutil.copytree(out, staged / "data-tiny")
        try:
            os.rename(staged / "data-tiny", Path(cache) / "data-tiny")
        except OSError:
            pass  # another session published it first
        shutil.rmtree(staged, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory, tiny_data) -> Path:
    """20 short stories with tiny_data's tokenizer, written as `lm2 tokenize` writes shards: an epoch is only a
    few steps long."""
    from lm2cli.data.tokenizer import Tokenizer
    from lm2cli.recipe import load_recipe

    out = tmp_path_factory.mktemp("data-mini")
    build_shards(out, load_recipe(TINY, ["tokenizer.vocab_size=400"]), corpus(20, seed=3), corpus(10, seed=4),
                 tok=Tokenizer.load(tiny_data / "tokenizer.model"))
    return out


@pytest.fixture
def tiny_args(tiny_data, tmp_path):
    """Arguments of `lm2 pretrain` for a tiny run in tmp_path/run; extend with more --set pairs."""

    def args(*sets: str, out: Path | None = None) -> list[str]:
        flat = []
        for s in [f"data.dir={tiny_data}", *SMALL_MODEL, *sets]:
            flat += ["--set", s]
        return [str(TINY), *flat, "--out", str(out or tmp_path / "run")]

    return args


@pytest.fixture
def interrupted_at(monkeypatch):
    """`with interrupted_at(step, signum): cli(...)`: the training loop sees that signal after that optimizer
    step, as if it had been sent (the run saves and exits 128 + signum); after the block the loop runs as usual."""
    import contextlib

    import lm2cli.training.loop as loop

    real = loop.stop_requested

    @contextlib.contextmanager
    def interrupt(step: int, signum: int):
        def stop_requested(s):
            if s.step == step:
                s.stop.signum = signum
            return real(s)

        monkeypatch.setattr(loop, "stop_requested", stop_requested)
        try:
            yield
        finally:
            monkeypatch.setattr(loop, "stop_requested", real)

    return interrupt
