"""Training's validation and `lm2 eval` score through the same session-free functions (lm2cli.scoring)."""

from __future__ import annotations

import pytest
import torch

from lm2cli.checkpoint import load_for_inference
from lm2cli.data.shards import TokenShards
from lm2cli.scoring import Scores, score_batches, score_logits, token_losses
from lm2cli.training import checkpoints as ck
from lm2cli.training.pretrain import PretrainData


def test_validation_loss_equals_the_scorer_fed_segment_by_segment(cli, tiny_args, tmp_path):
    """The validation a checkpoint records equals scoring the same rows with lm2cli.scoring outside any session,
    each row fed through the model state one memory segment at a time (as `lm2 eval`'s perplexity does), to
    1e-6; bits per byte too."""
    res = cli("pretrain", *tiny_args("train.steps=2", "train.eval_every=2", "train.eval_batches=2"))
    assert res.code == 0, res.err
    ckpt = tmp_path / "run/checkpoints/step_00000002"
    recorded = ck.read_trainer_state(ckpt)["val"]
    model, tokenizer, recipe = load_for_inference(ckpt)
    data = PretrainData(TokenShards.for_recipe(recipe), recipe, tokenizer)
    byte_lengths = torch.from_numpy(tokenizer.token_byte_lengths())
    seg = recipe.memory.segment_len
    chunked = Scores()
    with torch.no_grad():
        for batch in data.val_batches(0, 1):
            state = None
            for start in range(0, batch.inputs.shape[1], seg):
                logits, state = model(batch.inputs[:, start:start + seg], state)
                targets = batch.targets[:, start:start + seg]
                chunked += score_logits(logits, targets, float(byte_lengths[targets].sum()),
                                        losses=token_losses(logits, targets))
    assert chunked.targets == 2 * recipe.train.batch_size * recipe.train.seq_len
    assert chunked.loss == pytest.approx(recorded["val_loss"], rel=1e-6, abs=0)
    assert chunked.bits_per_byte == pytest.approx(recorded["val_bpb"], rel=1e-6, abs=0)
    whole = score_batches(model, data.val_batches(0, 1), "cpu")  # one forward per row, the training objective
    assert whole.loss == pytest.approx(recorded["val_loss"], rel=1e-6, abs=0)
    assert not model.training


def test_scores_add_and_survive_an_all_reduce_round_trip():
    a, b = Scores(3.0, 4, 10.0, 1, 2), Scores(1.5, 2, 0.0, 1, 1)
    total = a + b
    assert total == Scores(4.5, 6, 10.0, 2, 3) and Scores.from_tensor(total.to_tensor()) == total
    assert total.loss == 0.75 and total.exact_match == 2 / 3 and total.bits_per_byte == pytest.approx(4.5 / (
        10.0 * 0.6931471805599453))
    assert Scores().exact_match is None and Scores().bits_per_byte is None
