"""Perplexity and loss by position, and their agreement with training's validation (the shared scorer)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lm2cli.evaluation.decode import StateRunner
from lm2cli.evaluation.perplexity import (
    PerplexityPlan,
    bucket_edges,
    evaluate_perplexity,
    plan_perplexity,
    windows,
)
from lm2cli.recipe import load_recipe
from lm2cli.scoring import score_batches

from .conftest import UniformModel, tiny_model


def random_plan(tokenizer, seq_len: int, n: int, seed: int = 0) -> PerplexityPlan:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, tokenizer.vocab_size, size=n * seq_len + 1)
    seqs = windows(tokens, seq_len, n * seq_len)
    return PerplexityPlan(seq_len, seqs, {"kind": "test"}, bucket_edges(seq_len))


def test_uniform_model_perplexity_is_the_vocabulary_size(tokenizer):
    plan = random_plan(tokenizer, 600, 3)
    runner = StateRunner(UniformModel(tokenizer.vocab_size), 16, "cpu", batch_size=2)
    result = evaluate_perplexity(runner, tokenizer, plan, "uniform")
    assert result["ppl"] == pytest.approx(tokenizer.vocab_size, rel=1e-5)
    assert result["tokens"] == 1800
    assert [b["bucket"] for b in result["buckets"]] == ["0-128", "128-512", "512-2k"]
    assert [b["tokens"] for b in result["buckets"]] == [3 * 128, 3 * 384, 3 * 88]
    for b in result["buckets"]:
        assert b["loss"] == pytest.approx(math.log(tokenizer.vocab_size), rel=1e-5)
    assert result["bpb"] is not None and result["bpb"] > 0


def test_chunked_scoring_equals_one_forward_and_buckets_are_positions(tokenizer):
    """Fed chunk by chunk through the state, the loss is that of one full forward pass; each bucket averages
    exactly the positions it names."""
    model, recipe = tiny_model(tokenizer, "attention.window=24")
    plan = random_plan(tokenizer, 300, 4, seed=1)
    runner = StateRunner(model, recipe.memory.segment_len, "cpu", batch_size=3)
    runner.chunk_len = 32  # many chunks, not aligned with the buckets
    result = evaluate_perplexity(runner, tokenizer, plan, "m")
    rows = torch.from_numpy(np.stack(plan.sequences))
    with torch.no_grad():
        logits, _ = model(rows[:, :-1], None)
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(),
                                                   reduction="none").view(4, 300)
    assert result["loss"] == pytest.approx(float(losses.mean()), abs=1e-5)
    assert result["buckets"][0]["loss"] == pytest.approx(float(losses[:, :128].mean()), abs=1e-5)
    assert result["buckets"][1]["loss"] == pytest.approx(float(losses[:, 128:].mean()), abs=1e-5)


def test_windows_cover_the_tokens_once():
    tokens = np.arange(11)
    seqs = windows(tokens, 4, 100)
    assert [s.tolist() for s in seqs] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10]]
    assert sum(len(s) - 1 for s in windows(tokens, 4, 6)) == 6
    assert bucket_edges(2048) == [0, 128, 512, 2048] and bucket_edges(3000)[-1] == 8192


def test_text_files_and_validation_shards(tmp_path, tokenizer):
    from lm2cli.data.fingerprint import fingerprint_inputs
    from lm2cli.data.shards import ShardWriter, build_meta, token_dtype
    from lm2cli.errors import Lm2Error
    from lm2cli.fileio import atomic_write_json

    text = tmp_path / "book.txt"
    text.write_text("Mary went to the garden. " * 40)
    cfg = load_recipe(None, [f'eval.ppl_data=["{text}"]', "eval.ppl_seq_len=64", "eval.ppl_tokens=100"]).eval
    plan = plan_perplexity(cfg, str(tmp_path / "none"), tokenizer)
    assert plan.tokens == 100 and plan.sequences[0][0] == tokenizer.bos_id
    assert plan.source["kind"] == "text files"

    data = tmp_path / "data"
    recipe = load_recipe(None, [f"data.dir={data}"])
    writers = {}
    for split in ("train", "val"):
        w = ShardWriter(data, split, token_dtype(tokenizer.vocab_size))
        w.add(np.array(tokenizer.encode("John went to the office. " * 30, bos=True, eos=True)))
        w.commit()
        writers[split] = w
    tokenizer.save(data / "tokenizer.model")
    atomic_write_json(data / "meta.json", build_meta(tokenizer, writers, fingerprint_inputs(recipe), {}))
    cfg = load_recipe(None, ["eval.ppl_seq_len=50"]).eval
    plan = plan_perplexity(cfg, str(data), tokenizer)
    assert plan.source["kind"] == "validation shards" and plan.tokens == writers["val"].n_tokens - 1
    with pytest.raises(Lm2Error, match="lm2 tokenize"):
        plan_perplexity(cfg, str(tmp_path / "missing"), tokenizer)


def test_perplexity_equals_training_validation_on_the_same_rows(tokenizer, tmp_path):
    """On the rows training validates on, `lm2 eval`'s perplexity path (chunk by chunk through the model state,
    batched by the StateRunner) gives the loss and bits per byte of training's validation scorer to 1e-6."""
    from lm2cli.data.fingerprint import fingerprint_inputs
    from lm2cli.data.shards import ShardWriter, TokenShards, build_meta, token_dtype
    from lm2cli.fileio import atomic_write_json
    from lm2cli.training.pretrain import PretrainData

    model, recipe = tiny_model(tokenizer, "train.seq_len=80", "train.batch_size=3", "train.eval_batches=2",
                               f"data.dir={json.dumps(str(tmp_path))}")
    rng = np.random.default_rng(0)
    writers = {}
    for split, docs in (("train", 30), ("val", 30)):
        writers[split] = ShardWriter(tmp_path, split, token_dtype(tokenizer.vocab_size))
        for _ in range(docs):
            writers[split].add(rng.integers(5, tokenizer.vocab_size, size=int(rng.integers(20, 60))))
        writers[split].commit()
    atomic_write_json(tmp_path / "meta.json", build_meta(tokenizer, writers, fingerprint_inputs(recipe),
                                                         {"kind": "test"}))
    data = PretrainData(TokenShards.for_recipe(recipe), recipe, tokenizer)
    validation = score_batches(model, data.val_batches(0, 1), "cpu")  # what training's validation computes
    rows = [torch.cat([b.inputs, b.targets[:, -1:]], dim=1).numpy() for b in data.val_batches(0, 1)]
    plan = PerplexityPlan(80, [r for batch in rows for r in batch], {"kind": "test"}, bucket_edges(80))
    runner = StateRunner(model, recipe.memory.segment_len, "cpu", batch_size=4)
    runner.chunk_len = recipe.memory.segment_len  # five chunks per row: the state carries across them
    ours = evaluate_perplexity(runner, tokenizer, plan, "m")
    assert ours["tokens"] == validation.targets == 6 * 80
    assert ours["loss"] == pytest.approx(validation.loss, rel=1e-6, abs=0)
    assert ours["bpb"] == pytest.approx(validation.bits_per_byte, rel=1e-6, abs=0)
