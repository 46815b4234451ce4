"""Perplexity and loss by position; the pure batch scorer."""

from __future__ import annotations

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
from lm2cli.evaluation.scoring import IGNORE, score_batches, score_logits
from lm2cli.recipe import load_recipe

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


def test_score_batches_matches_the_training_loss(tokenizer):
    """The pure scorer computes what the training loop's loss_sum and exact match compute."""
    from lm2cli.training.loop import loss_sum

    model, _ = tiny_model(tokenizer)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(5, tokenizer.vocab_size, (3, 40), generator=g)
    targets = torch.randint(5, tokenizer.vocab_size, (3, 40), generator=g)
    targets[:, :30] = IGNORE  # answer rows: only the last 10 positions carry a target

    class B:
        pass

    batch = B()
    batch.inputs, batch.targets, batch.n_bytes, batch.answers = inputs, targets, 123.0, True
    with torch.no_grad():
        logits, _ = model(inputs, None)
        want = float(loss_sum(logits, targets))
    scores = score_batches(model, [batch, batch], "cpu")
    assert scores.loss_sum == pytest.approx(2 * want, rel=1e-6)
    assert scores.targets == 60 and scores.n_bytes == 246.0 and scores.answer_rows == 6
    assert model.training is False
    # teacher-forced exact match: a row counts when every answer position is the argmax
    perfect = targets.clone()
    perfect[:, 30:] = logits.argmax(-1)[:, 30:]
    perfect[1, 35] = (perfect[1, 35] + 1) % tokenizer.vocab_size
    s = score_logits(logits, perfect, answers=True)
    assert (s.correct_rows, s.answer_rows) == (2, 3) and s.exact_match == pytest.approx(2 / 3)
