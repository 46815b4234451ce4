"""`lm2 pretrain` end to end on a tiny model: files, resume, refusal, dry run, faults."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lm2cli import checkpoint as layout
from lm2cli.training import checkpoints as ck


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_learns_and_writes_the_run_directory(cli, tiny_args, tmp_path):
    run = tmp_path / "run"
    res = cli("pretrain", *tiny_args("train.steps=24", "train.eval_every=12", "train.save_every=6",
                                     "train.keep_last=2"))
    assert res.code == 0, res.err
    rows = metrics(run)
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val] == [0, 12, 24]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0  # clearly learning
    assert 0 < val[-1]["val_bpb"] < val[0]["val_bpb"]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 25)) and all(r["grad_norm"] > 0 for r in train)
    assert 0 < train[0]["epoch"] < train[1]["epoch"] < 1  # a fraction of an epoch, not rounded to whole ones
    assert train[0]["lr"] == pytest.approx(0.005)  # warm-up: step 1 of 2
    assert (run / "metrics.csv").read_text().count("\n") == len(rows) + 1
    assert (run / "recipe.toml").is_file()
    root = run / "checkpoints"
    # keep_last = 2 plus the best; 6 and 12 were rotated away unless best
    assert layout.list_checkpoints(root) == ["step_00000018", "step_00000024"]
    assert layout.read_pointer(root, "latest") == layout.read_pointer(root, "best") == "step_00000024"
    state = ck.read_trainer_state(root / "step_00000024")
    assert state["step"] == 24 and state["rows_done"] == 96 and state["val"]["val_loss"] == val[-1]["val_loss"]
    from lm2cli import __version__

    assert state["command"] == "pretrain" and state["lm2_version"] == __version__ and state["stage"] == 0
    assert state["eval_pending"] is False and state["best"]["best"]["checkpoint"] == "step_00000024"
    assert set(state["manifest"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                      "recipe.toml", "tokenizer.model"}
    assert "val loss" in res.out and "done: step 24" in res.out


def test_checkpoint_is_loadable_for_inference(cli, tiny_args, tmp_path):
    from lm2cli.checkpoint import load_for_inference

    assert cli("pretrain", *tiny_args("train.steps=2")).code == 0
    model, tok, recipe = load_for_inference(tmp_path / "run")
    assert recipe.model.vocab_size == tok.vocab_size == 400 and not model.training
    saved = load_file(str(tmp_path / "run/checkpoints/step_00000002/model.safetensors"))
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in saved)


def test_fresh_run_refuses_a_directory_with_checkpoints(cli, tiny_args):
    assert cli("pretrain", *tiny_args("train.steps=2")).code == 0
    res = cli("pretrain", *tiny_args("train.steps=2"))
    assert res.code == 2 and "already has checkpoints" in res.err and "--resume" in res.err
    assert res.err.count("\n") == 1


def test_resume_extends_a_finished_run(cli, tiny_args, tmp_path):
    assert cli("pretrain", *tiny_args("train.steps=4")).code == 0
    res = cli("pretrain", *tiny_args("train.steps=6"), "--resume")
    assert res.code == 0, res.err
    assert "resumed from" in res.out and "train.steps = 4 in the checkpoint, 6 now" in res.err
    assert [r["step"] for r in metrics(tmp_path / "run") if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    res = cli("pretrain", *tiny_args("train.steps=6"), "--resume")
    assert res.code == 0 and "nothing to train" in res.out


def test_resume_without_checkpoints_starts_fresh(cli, tiny_args, tmp_path):
    res = cli("pretrain", *tiny_args("train.steps=1"), "--resume")
    assert res.code == 0 and "starting a fresh run" in res.out


def test_shape_change_on_resume_is_an_error_naming_the_key(cli, tiny_args):
    assert cli("pretrain", *tiny_args("train.steps=1")).code == 0
    res = cli("pretrain", *tiny_args("train.steps=2", "memory.slots=8"), "--resume")
    assert res.code == 2 and "memory.slots = 4 in the checkpoint, 8 now" in res.err


def test_dry_run_reports_and_writes_nothing(cli, tiny_args, tmp_path):
    res = cli("pretrain", *tiny_args("train.grad_accum=2"), "--dry-run")
    assert res.code == 0, res.err
    for text in ("parameters (backbone", "memory ", "4 rows x 64 tokens x 2 micro-steps x 1 process(es) = 512 tokens",
                 "2 segments of 32 tokens", "tok/s", "dry run: nothing was written", "documents cropped"):
        assert text in res.out
    assert not (tmp_path / "run").exists()


def test_interrupt_saves_and_resume_is_exact_with_carried_memory(cli, tiny_args, tmp_path, interrupted_at):
    """An interrupt (as SIGINT sets it) mid-run, then --resume: identical to an uninterrupted run, with
    memory.carry on so the carried memory must come back from the checkpoint too."""
    sets = ("train.steps=10", "train.save_every=4", "train.eval_every=5", "memory.carry=true")
    assert cli("pretrain", *tiny_args(*sets, out=tmp_path / "a")).code == 0

    with interrupted_at(7, 2):
        res = cli("pretrain", *tiny_args(*sets, out=tmp_path / "b"))
    assert res.code == 130 and "stopped by SIGINT after step 7" in res.err and "--resume" in res.err
    assert (tmp_path / "b/checkpoints/step_00000007/memory_state.safetensors").is_file()
    assert cli("pretrain", *tiny_args(*sets, out=tmp_path / "b"), "--resume").code == 0
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    strip = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in b]
    wa = load_file(str(tmp_path / "a/checkpoints/step_00000010/model.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/step_00000010/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_non_finite_loss_stops_naming_the_step(cli, tiny_args, tmp_path, monkeypatch):
    import lm2cli.training.loop as loop

    real = loop.loss_sum
    calls = {"n": 0}

    def nan_on_fifth_step(logits, targets):
        calls["n"] += 1
        out = real(logits, targets)
        return out * float("nan") if calls["n"] == 5 + 1 else out  # +1: the step-0 validation batch

    monkeypatch.setattr(loop, "loss_sum", nan_on_fifth_step)
    res = cli("pretrain", *tiny_args("train.steps=8", "train.save_every=2", "train.eval_every=0",
                                     "train.eval_batches=1"))
    assert res.code == 2
    assert "non-finite loss nan at step 5" in res.err and "step_00000004" in res.err and "intact" in res.err
    root = tmp_path / "run/checkpoints"
    assert layout.list_checkpoints(root)[-1] == layout.read_pointer(root, "latest") == "step_00000004"
    ck.read_trainer_state(root / "step_00000004")


def test_corrupt_newest_checkpoint_is_reported_and_the_previous_resumes(cli, tiny_args, tmp_path):
    assert cli("pretrain", *tiny_args("train.steps=4", "train.save_every=2", "train.eval_every=0")).code == 0
    weights = tmp_path / "run/checkpoints/step_00000004/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    res = cli("pretrain", *tiny_args("train.steps=6"), "--resume")
    assert res.code == 2 and "step_00000004 is corrupt or truncated" in res.err
    assert "--resume-from" in res.err and "step_00000002" in res.err and res.err.count("\n") == 1
    prev = tmp_path / "run/checkpoints/step_00000002"
    res = cli("pretrain", *tiny_args("train.steps=6"), "--resume", prev)  # same as --resume-from PATH
    assert res.code == 0, res.err
    assert f"resumed from {prev}" in res.out


def test_bits_per_byte_counts_decoded_bytes(tiny_data):
    from lm2cli.data.shards import TokenShards

    shards = TokenShards(tiny_data)
    tok = shards.tokenizer()
    lengths = tok.token_byte_lengths()
    for i in range(3):
        doc = shards.document("val", i)
        text = tok.decode(doc)
        # SentencePiece drops the leading space of a decoded sequence; our count keeps it
        assert lengths[doc].sum() == len(text.encode("utf-8")) + 1


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_gradient_norm_stops_before_the_step(cli, tiny_args, tmp_path, monkeypatch):
    import lm2cli.training.loop as loop

    real = loop.loss_sum
    calls = {"n": 0}

    def inf_gradient_on_third_step(logits, targets):
        calls["n"] += 1
        if calls["n"] == 3 + 1:  # +1: the step-0 validation batch
            logits = InfiniteGradient.apply(logits)
        return real(logits, targets)

    monkeypatch.setattr(loop, "loss_sum", inf_gradient_on_third_step)
    res = cli("pretrain", *tiny_args("train.steps=5", "train.save_every=2", "train.eval_every=0",
                                     "train.eval_batches=1"))
    assert res.code == 2 and res.err.count("\n") == 1
    assert "non-finite gradient norm" in res.err and "at step 3" in res.err and "step_00000002" in res.err
    root = tmp_path / "run/checkpoints"
    assert layout.list_checkpoints(root) == ["step_00000002"]
    train = [r for r in metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)


def test_a_validation_left_pending_runs_first_on_resume(cli, tiny_args, tmp_path, monkeypatch):
    """Killed after the save of an evaluation step but before its validation: --resume validates that
    checkpoint first, records the result in it, then trains on."""
    import lm2cli.training.loop as loop

    real = loop.evaluate

    class Crash(Exception):
        pass

    def crash_at_step_2(s, data):
        if s.step == 2:
            raise Crash  # the process dies here, in validation, after the save
        return real(s, data)

    monkeypatch.setattr(loop, "evaluate", crash_at_step_2)
    sets = ("train.steps=4", "train.eval_every=2", "train.save_every=0", "train.eval_batches=1")
    with pytest.raises(Crash):
        cli("pretrain", *tiny_args(*sets))
    ckpt = tmp_path / "run/checkpoints/step_00000002"
    assert ck.read_trainer_state(ckpt)["eval_pending"] is True
    monkeypatch.setattr(loop, "evaluate", real)
    res = cli("pretrain", *tiny_args(*sets), "--resume")
    assert res.code == 0, res.err
    state = ck.read_trainer_state(ckpt)
    assert state["eval_pending"] is False and state["val"]["val_loss"] > 0
    val = [r for r in metrics(tmp_path / "run") if r["kind"] == "val"]
    assert [r["step"] for r in val] == [0, 2, 4]
    lines = res.out.splitlines()
    first_val = next(i for i, line in enumerate(lines) if "step 2: val loss" in line)
    assert first_val < next(i for i, line in enumerate(lines) if line.startswith("step 3/4"))
