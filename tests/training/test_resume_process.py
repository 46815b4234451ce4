"""Real processes: SIGKILL mid-run then --resume is bitwise identical to an uninterrupted run (across an
epoch boundary); SIGINT/SIGTERM finish the step, save, say how to resume and exit non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO


def launch(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lm2cli", "pretrain", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until metrics.jsonl has a train row for `step` (the run logs every step)."""
    deadline = time.monotonic() + timeout
    path = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and f'"kind": "train", "step": {step},' in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def rows(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")})  # timing differs
    return out


def same_files(a: Path, b: Path, name: str) -> bool:
    ta, tb = load_file(str(a / name)), load_file(str(b / name))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_sigkill_then_resume_is_bitwise_identical(cli, mini_data, tmp_path):
    from .conftest import SMALL_MODEL, TINY

    def args(out):
        sets = [f"data.dir={mini_data}", *SMALL_MODEL, "train.steps=24", "train.save_every=5", "train.eval_every=10"]
        return [str(TINY), *[x for s in sets for x in ("--set", s)], "--out", str(out)]

    assert cli("pretrain", *args(tmp_path / "a")).code == 0  # uninterrupted, in this process
    b = tmp_path / "b"
    proc = launch(args(b))
    wait_for_step(b, 13, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The kill lands after step 13 was logged: between two saves, or in the middle of writing step 15's
    # checkpoint (then an unfinished step_00000015.tmp is left, which resume must ignore).
    ckpts = sorted(p.name for p in (b / "checkpoints").iterdir()
                   if p.name.startswith("step_") and not p.name.endswith(".tmp"))
    assert ckpts[-1] in ("step_00000010", "step_00000015"), ckpts
    resumed_step = int(ckpts[-1].removeprefix("step_"))
    resumed = launch([*args(b), "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in out and ckpts[-1] in out
    ra, rb = rows(tmp_path / "a"), rows(b)
    assert ra == rb  # every logged loss, learning rate, gradient norm and validation number
    epochs = [r["epoch"] for r in ra if r["kind"] == "train"]
    # an epoch boundary before the checkpoint the run resumed from and another one after it
    assert 1 <= epochs[resumed_step - 1] and int(epochs[resumed_step - 1]) < int(epochs[-1])
    final_a, final_b = tmp_path / "a/checkpoints/step_00000024", b / "checkpoints/step_00000024"
    assert same_files(final_a, final_b, "model.safetensors")
    assert same_files(final_a, final_b, "optimizer.safetensors")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(tiny_args, tmp_path, sig):
    run = tmp_path / "run"
    proc = launch(tiny_args("train.steps=500", "train.eval_every=0", "train.save_every=0"))
    wait_for_step(run, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"stopped by {name} after step" in err and "Resume with: lm2 pretrain" in err and "--resume" in err
    assert "Traceback" not in err
    step = int(err.split("after step ")[1].split(";")[0])
    assert step >= 3
    state = json.loads((run / f"checkpoints/step_{step:08d}/trainer_state.json").read_text())
    assert state["step"] == step
