"""torchrun with 2 CPU processes (gloo), DDP and FSDP: same loss curve as one process at the same global
batch; an FSDP checkpoint is the ordinary format and resumes in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, SMALL_MODEL, TINY
from .test_finetune import qa_rows


def run_args(data, out, batch_size, *more):
    sets = [f"data.dir={data}", *SMALL_MODEL, f"train.batch_size={batch_size}", "train.steps=6",
            "train.save_every=3", "train.eval_every=3", "train.eval_batches=4", *more]
    return [str(TINY), *[x for s in sets for x in ("--set", s)], "--out", str(out)]


def curve(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in rows if r["kind"] == "train"], [r["val_loss"] for r in rows if r["kind"] == "val"])


def torchrun(args, command="pretrain"):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lm2cli", command, *args], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_at_the_same_global_batch(cli, tiny_data, tmp_path, strategy):
    assert cli("pretrain", *run_args(tiny_data, tmp_path / "one", 4)).code == 0
    proc = torchrun(run_args(tiny_data, tmp_path / "two", 2, f"train.distributed={strategy}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (gloo)" in proc.stdout
    assert ("FSDP: parameters, gradients and optimizer state sharded" in proc.stdout) == (strategy == "fsdp")
    assert proc.stdout.count("done: step 6") == 1  # rank 0 alone reports
    train1, val1 = curve(tmp_path / "one")
    train2, val2 = curve(tmp_path / "two")
    assert len(train1) == len(train2) == 6 and len(val1) == len(val2) == 3
    assert train2 == pytest.approx(train1, rel=1e-4)
    assert val2 == pytest.approx(val1, rel=1e-4)
    state = json.loads((tmp_path / "two/checkpoints/step_00000006/trainer_state.json").read_text())
    assert state["world_size"] == 2 and set(state["rng"]) == {"rank0", "rank1"}


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process(cli, tiny_data, tmp_path):
    """An FSDP run saved at step 3 (gathered to the shared format) resumes unsharded and ends like a run that
    never used FSDP."""
    assert cli("pretrain", *run_args(tiny_data, tmp_path / "one", 4)).code == 0
    proc = torchrun(run_args(tiny_data, tmp_path / "mixed", 2, "train.distributed=fsdp", "train.steps=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = cli("pretrain", *run_args(tiny_data, tmp_path / "mixed", 4, "train.distributed=fsdp"), "--resume")
    assert res.code == 0, res.err
    assert "2 processes, this run has 1" in res.err  # RNG states cannot carry over; the data order does
    train1, val1 = curve(tmp_path / "one")
    train2, val2 = curve(tmp_path / "mixed")
    assert train2 == pytest.approx(train1, rel=1e-4) and val2 == pytest.approx(val1, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_validation_by_length_is_summed_over_processes(cli, tiny_data, tmp_path, strategy):
    """A fine-tune whose validation mixes two lengths reports each one; two processes (each scoring its share of
    the batches, one all-reduce for every length) record what one process records. Its one-segment rows leave
    the memory's write weights without a gradient in some batches: DDP searches for unused parameters."""
    for name, lengths in (("train", (("0k", 1), ("1k", 3))), ("val", (("0k", 1), ("1k", 3)))):
        (tmp_path / name / "qa1").mkdir(parents=True)
        for length, n_facts in lengths:
            rows = qa_rows(n_facts, 24 if name == "train" else 6, seed=n_facts + (0 if name == "train" else 50))
            (tmp_path / name / "qa1" / f"{length}.json").write_text(json.dumps(rows))
    more = [f"finetune.data={tmp_path / 'train'}", f"finetune.val_data={tmp_path / 'val'}", "finetune.stages=[2]"]
    assert cli("finetune", *run_args(tiny_data, tmp_path / "one", 4, *more)).code == 0
    proc = torchrun(run_args(tiny_data, tmp_path / "two", 2, *more, f"train.distributed={strategy}"),
                    command="finetune")
    assert proc.returncode == 0, proc.stderr[-3000:]

    def by_length(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "@" in k} for r in rows if r["kind"] == "val"]

    one, two = by_length(tmp_path / "one"), by_length(tmp_path / "two")
    assert len(one) == 3 and all(r["val_rows@0k"] == r["val_rows@1k"] == 6 for r in one)
    assert [r.keys() for r in two] == [r.keys() for r in one]
    for a, b in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.parametrize("completed", [True, False])
def test_shutdown_frees_fsdp_cycles_before_ending_the_group(monkeypatch, completed):
    """FSDP's hooks keep the process group alive in reference cycles; if the group outlives
    destroy_process_group its gloo threads abort the process at exit (rank 1 SIGABRT after a completed run, about
    one launch in ten under load). So: collect, barrier (only after a completed run: after an error a peer may be
    gone and the barrier would hang), then destroy."""
    from lm2cli.training import runtime

    calls = []
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(runtime.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(runtime.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(runtime.gc, "collect", lambda: calls.append("collect"))
    rt = runtime.Runtime(runtime.torch.device("cpu"), "fp32", "", rank=1, world=2, backend="gloo")
    runtime.shutdown(rt, completed)
    assert calls == (["collect", "barrier", "destroy"] if completed else ["collect", "destroy"])
    calls.clear()
    runtime.shutdown(runtime.Runtime(runtime.torch.device("cpu"), "fp32", ""), completed)
    assert calls == []  # one process: no group to end
