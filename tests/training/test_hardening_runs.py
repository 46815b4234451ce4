"""Issue 9 on real (tiny) runs: every command that reads a checkpoint refuses a tampered one, a run never
writes over a user's files, hand-edited state gives one line, leftovers are cleaned, causes are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lm2cli import checkpoint as layout
from lm2cli.checkpoint import write_state_file
from lm2cli.training import checkpoints as ck

from .conftest import SMALL_MODEL, TINY

STEPS = ("train.steps=2", "train.eval_every=0", "train.eval_batches=1")


def one_error(res, code: int = 2) -> str:
    """The single `error:` line of a refused command (and no traceback)."""
    lines = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert res.code == code and len(lines) == 1 and "Traceback" not in res.err, (res.code, res.err)
    return lines[0]


def resign(ckpt: Path) -> None:
    """Rewrite the manifest after an edit, as whoever edits a checkpoint can: only decoding can refuse then."""
    write_state_file(ckpt, json.loads((ckpt / ck.STATE_FILE).read_text()))


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A 2-step pretraining run and a 1-step jsonl fine-tuning run started from it (each used read-only)."""
    from lm2cli.cli import run

    root = tmp_path_factory.mktemp("hardening")
    sets = [f"data.dir={tiny_data}", *SMALL_MODEL, *STEPS]
    flat = [x for s in sets for x in ("--set", s)]
    assert run(["pretrain", str(TINY), *flat, "--out", str(root / "pre")]) == 0
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Where is Mary {i}?", "response": "kitchen"}) + "\n"
                            for i in range(20)))
    ft = [*flat, "--set", f"finetune.init_from={root / 'pre'}", "--set", "finetune.format=jsonl",
          "--set", f"finetune.data={rows}", "--set", "train.steps=1"]
    assert run(["finetune", str(TINY), *ft, "--out", str(root / "ft")]) == 0
    return root, flat, ft


def copy_run(trained, name: str, dest: Path) -> Path:
    shutil.copytree(trained[0] / name, dest)
    return dest


def newest(run: Path) -> Path:
    return run / "checkpoints" / layout.newest_checkpoint(run / "checkpoints")


# ------------------------------------------------------------ every reader refuses a tampered checkpoint


READERS = ["generate", "pretrain --resume", "finetune init_from", "finetune --resume"]


def read_with(cli, trained, reader: str, run: Path, tmp_path: Path, *extra: str):
    _, flat, ft = trained
    if reader == "generate":
        return cli("generate", run, "--prompt", "Mary went to the", "--max-new-tokens", "3", *extra)
    if reader == "pretrain --resume":
        return cli("pretrain", TINY, *flat, "--set", "train.steps=3", "--out", run, "--resume", *extra)
    if reader == "finetune init_from":
        return cli("finetune", TINY, *ft, "--set", f"finetune.init_from={run}", "--out", tmp_path / "new", *extra)
    return cli("finetune", TINY, *ft, "--set", "train.steps=2", "--out", run, "--resume", *extra)


@pytest.mark.parametrize("reader", READERS)
def test_each_reader_refuses_changed_weights_naming_the_file(cli, trained, tmp_path, reader):
    run = copy_run(trained, "ft" if reader == "finetune --resume" else "pre", tmp_path / "run")
    flip_byte(newest(run) / "model.safetensors")  # same size, other bytes: only the sha256 can tell
    line = one_error(read_with(cli, trained, reader, run, tmp_path))
    assert "model.safetensors does not match its recorded sha256" in line and str(newest(run)) in line
    assert "--no-verify-checksums" in line


def test_generate_without_checksums_still_checks_sizes(cli, trained, tmp_path):
    run = copy_run(trained, "pre", tmp_path / "run")
    weights = newest(run) / "model.safetensors"
    flip_byte(weights, offset=-5)
    res = read_with(cli, trained, "generate", run, tmp_path, "--no-verify-checksums")
    assert res.code == 0, res.err  # the documented way to skip the sha256 (the flip lands in a weight)
    weights.write_bytes(weights.read_bytes()[:-4])
    line = one_error(read_with(cli, trained, "generate", run, tmp_path, "--no-verify-checksums"))
    assert "model.safetensors has" in line and "the manifest says" in line


@pytest.mark.parametrize("reader", READERS)
def test_each_reader_refuses_resigned_non_finite_weights(cli, trained, tmp_path, reader):
    import torch
    from safetensors.torch import load_file, save_file

    run = copy_run(trained, "ft" if reader == "finetune --resume" else "pre", tmp_path / "run")
    ckpt = newest(run)
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["norm.weight"] = torch.full_like(weights["norm.weight"], float("nan"))
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    resign(ckpt)
    line = one_error(read_with(cli, trained, reader, run, tmp_path))
    assert "norm.weight holds non-finite values" in line


@pytest.mark.parametrize("edit,expected", [
    (lambda s: s.pop("rng"), "rng must be an object"),  # was KeyError: 'rng'
    (lambda s: s.update(step="7"), "step = \"7\", expected an integer"),
    (lambda s: s.update(rows_done=-1), "rows_done = -1"),
    (lambda s: s.update(best={"best": {"val_loss": 1.0, "checkpoint": "../../elsewhere"}}), "best.best must be"),
    (lambda s: s["rng"]["rank0"]["python"].update(key="00"), "rng.rank0: python.key must be"),
    (lambda s: s.update(memory_carried="yes"), "memory_carried"),
    (lambda s: s.update(command="rm -rf"), "command = \"rm -rf\""),
    (lambda s: s["manifest"].update({"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}), "the manifest names"),
    (lambda s: s["manifest"]["model.safetensors"].update(bytes="big"), "manifest entry of model.safetensors"),
])
def test_hand_edited_trainer_state_is_one_line(cli, trained, tmp_path, edit, expected):
    run = copy_run(trained, "pre", tmp_path / "run")
    path = newest(run) / ck.STATE_FILE
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    line = one_error(read_with(cli, trained, "pretrain --resume", run, tmp_path))
    assert expected in line and "trainer_state.json" in line


def test_resigned_optimizer_and_rng_files_are_checked(cli, trained, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    run = copy_run(trained, "pre", tmp_path / "run")
    ckpt = newest(run)
    from safetensors import safe_open

    opt = load_file(str(ckpt / ck.OPTIMIZER_FILE))
    with safe_open(str(ckpt / ck.OPTIMIZER_FILE), "pt") as f:  # keep its metadata, rename one entry
        meta = f.metadata()
    key = next(k for k in opt if k.endswith("/exp_avg"))
    opt[key.replace("/exp_avg", "/evil")] = opt.pop(key)
    save_file(opt, str(ckpt / ck.OPTIMIZER_FILE), metadata=meta)
    resign(ckpt)
    assert "unexpected entry 'state/" in one_error(read_with(cli, trained, "pretrain --resume", run, tmp_path))

    run = copy_run(trained, "pre", tmp_path / "run2")
    ckpt = newest(run)
    save_file({"rank0.torch_cpu": torch.zeros(3, dtype=torch.uint8)}, str(ckpt / ck.RNG_FILE))
    resign(ckpt)
    line = one_error(read_with(cli, trained, "pretrain --resume", run, tmp_path))
    assert "rng.safetensors: rank0.torch_cpu is not a torch generator state" in line


# ------------------------------------------------------------------------------ pointers and leftovers


def test_pointers_never_lead_outside_the_run(cli, trained, tmp_path):
    run = copy_run(trained, "pre", tmp_path / "run")
    elsewhere = copy_run(trained, "ft", tmp_path / "elsewhere")
    target = layout.newest_checkpoint(elsewhere / "checkpoints")
    (run / "checkpoints" / "latest").write_text(f"../../elsewhere/checkpoints/{target}")
    res = cli("generate", run, "--prompt", "Mary", "--max-new-tokens", "2")
    assert res.code == 0, res.err
    assert f"{run}/checkpoints/step_00000002" in res.err  # the run's own newest, by the rule resume uses


def test_a_killed_pointer_write_does_not_pin_a_checkpoint(tmp_path):
    """A kill during a pointer write leaves `.latest.XXXX.tmp`; it is not a pointer, and the next start
    removes it."""
    from .test_checkpoints import save, tiny_model

    model = tiny_model()
    for step in range(1, 5):
        save(tmp_path, step, model)
    (tmp_path / ".latest.k2j4h1xz.tmp").write_text("step_00000001\n")
    assert ck.rotate(tmp_path, keep_last=2, protected=set()) == ["step_00000001", "step_00000002"]
    assert ck.remove_stale_tmp(tmp_path) == [".latest.k2j4h1xz.tmp"]


def test_resume_reports_what_an_interrupted_save_left(cli, trained, tmp_path):
    run = copy_run(trained, "pre", tmp_path / "run")
    (run / "checkpoints" / "step_00000009.tmp").mkdir()
    (run / "checkpoints" / ".latest.abc123xy.tmp").write_text("step_00000001")
    res = read_with(cli, trained, "pretrain --resume", run, tmp_path)
    assert res.code == 0, res.err
    assert "removed what an interrupted save left behind: .latest.abc123xy.tmp, step_00000009.tmp" in res.out
    assert not (run / "checkpoints" / "step_00000009.tmp").exists()


# ------------------------------------------------------------------------------- the user's files


def test_a_run_never_replaces_the_users_recipe(cli, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = "# my experiment, with comments\n" + TINY.read_text()
    (tmp_path / "recipe.toml").write_text(mine)
    sets = [x for s in [f"data.dir={tiny_data}", *SMALL_MODEL, *STEPS] for x in ("--set", s)]
    line = one_error(cli("pretrain", "recipe.toml", *sets, "--out", "."))
    assert "holds a recipe.toml that lm2 did not write" in line
    assert (tmp_path / "recipe.toml").read_text() == mine and sorted(p.name for p in tmp_path.iterdir()) == [
        "recipe.toml"]
    line = one_error(cli("pretrain", "recipe.toml", *sets, "--out", ""))
    assert "--out is empty" in line and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]
    assert cli("pretrain", "recipe.toml", *sets, "--out", "run").code == 0  # what the message suggests
    # the run's own resolved recipe continues it in place (the printed resume command)
    assert cli("pretrain", "run/recipe.toml", "--set", "train.steps=3", "--resume").code == 0


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_foreign_directory_is_refused(cli, tiny_data, tmp_path, command):
    (tmp_path / "notes.txt").write_text("mine")
    sets = [x for s in [f"data.dir={tiny_data}", *SMALL_MODEL, *STEPS] for x in ("--set", s)]
    line = one_error(cli(command, TINY, *sets, "--out", tmp_path))
    assert "is not empty and is not an lm2 run directory (it holds notes.txt)" in line


# ------------------------------------------------------------------------------------- token shards


def shard_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def pretrain_on(cli, data: Path, tmp_path: Path):
    sets = [x for s in [f"data.dir={data}", *SMALL_MODEL, *STEPS] for x in ("--set", s)]
    return cli("pretrain", TINY, *sets, "--out", tmp_path / "run")


def test_token_id_beyond_the_vocabulary_is_refused_naming_the_shard(cli, mini_data, tmp_path):
    data = shard_copy(mini_data, tmp_path / "data")
    tokens = np.fromfile(data / "train.bin", dtype="<u2")
    tokens[5:] = 60000  # every row gets one (was: IndexError mid-training)
    tokens.tofile(data / "train.bin")
    line = one_error(pretrain_on(cli, data, tmp_path))
    assert "train.bin: token id 60000" in line and "vocabulary size 400" in line


@pytest.mark.parametrize("edit,expected", [
    (lambda m: m.update(dtype="object"), "dtype = \"object\""),
    (lambda m: m.update(vocab_size="400"), "vocab_size = \"400\""),
    (lambda m: m.update(dtype="uint16", vocab_size=70000), "cannot hold the ids"),
    (lambda m: m["splits"].pop("val"), "splits.val"),
])
def test_hand_edited_meta_json_is_refused(cli, mini_data, tmp_path, edit, expected):
    data = shard_copy(mini_data, tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    edit(meta)
    (data / "meta.json").write_text(json.dumps(meta))
    assert expected in one_error(pretrain_on(cli, data, tmp_path))


def test_decreasing_document_offsets_are_refused(cli, mini_data, tmp_path):
    data = shard_copy(mini_data, tmp_path / "data")
    idx = np.fromfile(data / "train.idx", dtype="<u8")
    idx[3], idx[4] = idx[4], idx[3]
    idx.tofile(data / "train.idx")
    assert "train.idx is corrupt (document offsets" in one_error(pretrain_on(cli, data, tmp_path))


# ------------------------------------------------------------------------------------ causes, values


def test_non_finite_loss_before_any_update_blames_the_start_not_the_learning_rate(cli, tiny_args):
    line = one_error(cli("pretrain", *tiny_args(*STEPS, "model.init_std=1e39")))
    assert "before any update of this run, so it is not the learning rate" in line
    assert "the weights are already non-finite" in line and "model.init_std = 1e+39" in line
    assert "Lower train.lr" not in line


@pytest.mark.parametrize("key", ["train.lr", "model.init_std", "train.weight_decay", "train.memory_lr_mult",
                                 "model.norm_eps", "model.rope_theta", "memory.out_gate_bias", "generate.temperature"])
def test_infinite_values_are_refused(cli, tiny_args, key):
    assert "must be a finite number" in one_error(cli("pretrain", *tiny_args(f"{key}=inf"), "--print-recipe"))


def test_grad_clip_inf_still_means_only_log(cli, tiny_args):
    assert cli("pretrain", *tiny_args("train.grad_clip=inf"), "--print-recipe").code == 0


# --------------------------------------------------------------------- sizes that cannot be allocated


def limit_memory():
    """A regression must fail fast in the child instead of swapping a shared machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


@pytest.mark.parametrize("setting,key", [("memory.slots=10000000000", "lower memory.slots"),
                                         ("model.d_model=1048576", "lower model.d_model")])
def test_sizes_that_cannot_be_allocated_are_refused_before_allocating(cli, tiny_args, setting, key):
    # in-process is safe here: without the check, the first allocation (terabytes at once) fails immediately
    line = one_error(cli("pretrain", *tiny_args(*STEPS, setting)))
    assert "training needs at least" in line and key in line


def test_a_batch_that_cannot_be_allocated_is_refused_before_allocating(tiny_args, lm2_proc):
    # in a child with an address-space limit: without the check, this one allocates row by row for minutes
    res = lm2_proc("pretrain", *tiny_args(*STEPS, "train.batch_size=100000000"), preexec_fn=limit_memory, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "training needs at least" in lines[0] and "lower train.batch_size" in lines[0]
