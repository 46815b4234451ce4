"""Loop options that must not change the result: gradient accumulation, activation checkpointing; and the
outputs: console lines, TensorBoard."""

from __future__ import annotations

import json
import math
import sys

import pytest


def train_losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_accumulation_matches_one_big_batch(cli, tiny_args, tmp_path):
    base = ("train.steps=4", "train.eval_every=0", "train.eval_batches=1")
    assert cli("pretrain", *tiny_args(*base, "train.batch_size=4", out=tmp_path / "big")).code == 0
    assert cli("pretrain", *tiny_args(*base, "train.batch_size=2", "train.grad_accum=2",
                                      out=tmp_path / "acc")).code == 0
    assert train_losses(tmp_path / "acc") == pytest.approx(train_losses(tmp_path / "big"), rel=1e-5)


def test_activation_checkpointing_gives_the_same_run(cli, tiny_args, tmp_path):
    base = ("train.steps=3", "train.eval_every=0", "train.eval_batches=1", "memory.bptt=1")
    assert cli("pretrain", *tiny_args(*base, out=tmp_path / "plain")).code == 0
    assert cli("pretrain", *tiny_args(*base, "train.activation_checkpointing=true", out=tmp_path / "ckpt")).code == 0
    assert train_losses(tmp_path / "ckpt") == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-5)


def test_memory_lr_multiplier_changes_only_memory_updates(cli, tiny_args, tmp_path):
    import torch
    from safetensors.torch import load_file

    base = ("train.steps=1", "train.eval_every=0", "train.eval_batches=1", "train.warmup_steps=0")
    assert cli("pretrain", *tiny_args(*base, out=tmp_path / "x1")).code == 0
    assert cli("pretrain", *tiny_args(*base, "train.memory_lr_mult=0.001", out=tmp_path / "slow")).code == 0
    a = load_file(str(tmp_path / "x1/checkpoints/step_00000001/model.safetensors"))
    b = load_file(str(tmp_path / "slow/checkpoints/step_00000001/model.safetensors"))
    from lm2cli.model import LanguageModel

    memory = [k for k in a if LanguageModel.is_memory_param(k)]
    assert memory and len(memory) < len(a)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in memory)  # backbone: the same update
    assert all(not torch.equal(a[k], b[k]) for k in memory if k.endswith("weight"))


def test_bf16_autocast_trains_close_to_fp32(cli, tiny_args, tmp_path):
    base = ("train.steps=3", "train.eval_every=0", "train.eval_batches=1")
    res = cli("pretrain", *tiny_args(*base, "train.dtype=bf16", out=tmp_path / "bf16"))
    assert res.code == 0, res.err
    assert "bf16 (train.dtype = bf16)" in res.out
    assert cli("pretrain", *tiny_args(*base, out=tmp_path / "fp32")).code == 0
    bf16, fp32 = train_losses(tmp_path / "bf16"), train_losses(tmp_path / "fp32")
    assert all(math.isfinite(x) for x in bf16) and bf16 != fp32  # really computed in bf16
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_deterministic_algorithms_are_on_during_the_run_and_change_nothing_on_cpu(cli, tiny_args, tmp_path):
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []
    handle = register_optimizer_step_pre_hook(lambda *_: seen.append(torch.are_deterministic_algorithms_enabled()))
    base = ("train.steps=2", "train.eval_every=0", "train.eval_batches=1")
    try:
        assert cli("pretrain", *tiny_args(*base, "train.deterministic=true", out=tmp_path / "det")).code == 0
    finally:
        handle.remove()
        torch.use_deterministic_algorithms(False)  # the setting is process-wide; later tests expect the default
    assert seen == [True, True]
    assert cli("pretrain", *tiny_args(*base, out=tmp_path / "plain")).code == 0
    assert train_losses(tmp_path / "det") == train_losses(tmp_path / "plain")  # CPU runs are reproducible anyway


def test_plain_lines_without_a_terminal(cli, tiny_args):
    res = cli("pretrain", *tiny_args("train.steps=2", "train.eval_batches=1"))
    line = [ln for ln in res.out.splitlines() if ln.startswith("step 2/2")][0]
    assert "| loss " in line and "| lr " in line and "tok/s" in line and "| eta " in line


def test_progress_bar_on_a_terminal(monkeypatch, capsys):
    from lm2cli.training.metrics import Console

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    console = Console(True, total_steps=10, first_step=0, desc="pretrain")
    assert console.bar is not None
    console.step(3, 2.5, 1e-3, 1234.0, None)
    console.say("a message")
    console.close()
    out, err = capsys.readouterr()
    assert "a message" in out and "loss 2.5000" in err and "3/10" in err


def test_tensorboard_gets_scalars_when_installed(monkeypatch, tmp_path):
    import lm2cli.training.metrics as metrics

    calls = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append("closed")

    monkeypatch.setattr(metrics, "_tensorboard_writer", lambda run_dir: FakeWriter())
    log = metrics.MetricsLog(tmp_path, tensorboard=True)
    log.write({"kind": "train", "step": 3, "stage": 1, "loss": 2.0, "lr": 0.1, "mfu": None})
    log.write({"kind": "val", "step": 3, "stage": 1, "val_loss": 1.5})
    log.close()
    assert calls == [("train/loss", 2.0, 3), ("train/lr", 0.1, 3), ("val/val_loss", 1.5, 3), "closed"]


@pytest.mark.slow
def test_compiled_training_saves_the_plain_model(cli, tiny_args, tmp_path):
    """torch.compile (about a minute of compilation on CPU): the checkpoint holds plain parameter names."""
    from safetensors.torch import load_file

    res = cli("pretrain", *tiny_args("train.steps=2", "train.compile=true", "train.eval_batches=1"))
    assert res.code == 0, res.err
    keys = load_file(str(tmp_path / "run/checkpoints/step_00000002/model.safetensors")).keys()
    assert "norm.weight" in keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)


def test_a_second_ctrl_c_interrupts_immediately():
    """The first SIGINT only asks the loop to stop after the step; the second raises KeyboardInterrupt at once
    (for a save that hangs)."""
    import os
    import signal
    import time

    from lm2cli.training.runtime import StopRequest

    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread between two bytecodes
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is not stop._handle
