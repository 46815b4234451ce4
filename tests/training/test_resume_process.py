"""Real processes: SIGKILL at a known moment (helpers/crash_at.py: between two saves, or inside a save) then
--resume is bitwise identical to an uninterrupted run (across an epoch boundary); SIGINT/SIGTERM finish the
step, save, say how to resume and exit non-zero."""

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

CRASH_AT = Path(__file__).resolve().parent / "helpers" / "crash_at.py"


def launch(args: list[str], crash: tuple[str, int] | None = None) -> subprocess.Popen:
    """`lm2 pretrain ARGS` as a real process; `crash=(where, step)` makes it SIGKILL itself there (crash_at.py)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    entry = [str(CRASH_AT), crash[0], str(crash[1])] if crash else ["-m", "lm2cli"]
    return subprocess.Popen([sys.executable, *entry, "pretrain", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until metrics.jsonl has a train row for `step` (the run logs every step)."""
    deadline = time.monotonic() + timeout
    path = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and any(r.get("kind") == "train" and r.get("step") == step for r in rows(run)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def rows(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if not line.endswith("}"):
            continue  # a line still being written
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")})  # timing differs
    return out


def same_files(a: Path, b: Path, name: str) -> bool:
    ta, tb = load_file(str(a / name)), load_file(str(b / name))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def uninterrupted(mini_data, tmp_path_factory):
    """The reference run, in this process: 24 steps, saves every 5, validation every 10."""
    from lm2cli.cli import run

    out = tmp_path_factory.mktemp("uninterrupted") / "a"
    assert run(["pretrain", *crash_args(mini_data, out)]) == 0
    return out


def crash_args(mini_data: Path, out: Path) -> list[str]:
    from .conftest import SMALL_MODEL, TINY

    sets = [f"data.dir={mini_data}", *SMALL_MODEL, "train.steps=24", "train.save_every=5", "train.eval_every=10"]
    return [str(TINY), *[x for s in sets for x in ("--set", s)], "--out", str(out)]


@pytest.mark.parametrize("crash, resumed_from", [(("after-step", 13), 10), (("in-save", 15), 10)],
                         ids=["between-saves", "while-saving"])
def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, mini_data, tmp_path, crash, resumed_from):
    """SIGKILL between two saves, or while a checkpoint is being written (its .tmp directory is left behind),
    then --resume: the same run as the uninterrupted one, across an epoch boundary."""
    b = tmp_path / "b"
    proc = launch(crash_args(mini_data, b), crash=crash)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    names = sorted(p.name for p in (b / "checkpoints").iterdir() if p.name.startswith("step_"))
    expected = [f"step_{n:08d}" for n in (5, 10)] + (["step_00000015.tmp"] if crash[0] == "in-save" else [])
    assert names == expected
    assert (b / "checkpoints/latest").read_text().strip() == f"step_{resumed_from:08d}"
    resumed = launch([*crash_args(mini_data, b), "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed from {b / 'checkpoints' / f'step_{resumed_from:08d}'}" in out
    assert not (b / "checkpoints/step_00000015.tmp").exists()
    ra, rb = rows(uninterrupted), rows(b)
    assert ra == rb  # every logged loss, learning rate, gradient norm and validation number
    epochs = [r["epoch"] for r in ra if r["kind"] == "train"]
    # an epoch boundary before the checkpoint the run resumed from and another one after it
    assert 1 <= epochs[resumed_from - 1] and int(epochs[resumed_from - 1]) < int(epochs[-1])
    final_a, final_b = uninterrupted / "checkpoints/step_00000024", b / "checkpoints/step_00000024"
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
