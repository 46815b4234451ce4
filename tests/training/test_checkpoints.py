"""Checkpoint directories: atomic save, pickle-free optimizer/RNG state, rotation, corruption (the carried
memory: test_hostile_memory_state.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_model
from torch import nn

from lm2cli import checkpoint as layout
from lm2cli.errors import Lm2Error
from lm2cli.training import checkpoints as ck


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def run_steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randn(4, 6, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def model_files(model):
    """What save_model_files writes, for a model that is not an lm2 LanguageModel."""

    def write(d):
        save_model(model, str(d / "model.safetensors"))
        (d / "recipe.toml").write_text("# Resolved lm2 recipe (test)\n")
        (d / "tokenizer.model").write_bytes(b"test")

    return write


def save(root, step, model, opt=None, state=None, memory=None):
    tensors, info = ck.capture_rng(0)
    opt = opt or torch.optim.AdamW(model.parameters())
    full = {"command": "pretrain", "step": step, "rows_done": 0, "stage": 0, "world_size": 1, "eval_pending": False,
            "memory_carried": False, "best": {}, "rng": {"rank0": info}, **(state or {})}
    return ck.save_checkpoint(root, step, model_files(model), full, opt.state_dict(), tensors, memory)


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run_steps(model, opt, 3)
    ckpt = save(tmp_path, 3, model, opt)
    expected = run_steps(model, opt, 4, seed=1)
    final = [p.detach().clone() for p in model.parameters()]

    from safetensors.torch import load_model

    model2 = tiny_model()
    load_model(model2, str(ckpt / "model.safetensors"))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ck.load_optimizer_state(opt2, ckpt)
    assert run_steps(model2, opt2, 4, seed=1) == expected
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), final, strict=True))


def test_optimizer_layout_mismatch_is_an_error(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run_steps(model, opt, 1)
    ckpt = save(tmp_path, 1, model, opt)
    other = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(Lm2Error, match="optimizer groups"):
        ck.load_optimizer_state(torch.optim.AdamW(other.parameters()), ckpt)


def test_optimizer_tensor_of_the_wrong_shape_is_reported(tmp_path):
    """Same groups and parameter counts, different shapes: the moments must not be loaded silently."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run_steps(model, opt, 1)
    ckpt = save(tmp_path, 1, model, opt)
    wider = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(Lm2Error, match=r"optimizer tensor exp_avg\w* of parameter 0 has shape \(8, 6\), "
                                       r"the parameter \(9, 6\)"):
        ck.load_optimizer_state(torch.optim.AdamW(wider.parameters()), ckpt)


def test_name_keyed_optimizer_state_reads_back_by_name(tmp_path):
    """FSDP checkpoints key the optimizer state by parameter name; reading gives back names, not positions."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run_steps(model, opt, 1)
    sd = opt.state_dict()
    names = ck.optimizer_param_names(model, opt)
    by_name = dict(sd, state=ck.rekey(sd["state"], names, by_name=True))
    tensors, meta = ck.flatten_optimizer_state(by_name)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / ck.OPTIMIZER_FILE, metadata={"lm2": json.dumps(meta)})
    state, _ = ck.read_optimizer_state(tmp_path)
    assert sorted(state) == sorted(names) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.equal(state["0.weight"]["exp_avg"], sd["state"][0]["exp_avg"])
    opt2 = torch.optim.AdamW(tiny_model().parameters(), lr=1e-2)
    ck.load_optimizer_state(opt2, tmp_path, names)  # name-keyed state into a plain optimizer
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)
    tensors, info = ck.capture_rng(0)
    json.dumps(info)  # plain JSON
    before = (random.random(), random.gauss(0, 1), np.random.rand(), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.restore_rng(0, tensors, info)
    assert (random.random(), random.gauss(0, 1), np.random.rand(), float(torch.rand(()))) == before


def test_save_is_atomic_and_points_latest(tmp_path):
    model = tiny_model()
    path = save(tmp_path, 5, model)
    assert path.name == "step_00000005" and not (tmp_path / "step_00000005.tmp").exists()
    assert layout.read_pointer(tmp_path, "latest") == "step_00000005"
    state = ck.read_trainer_state(path)
    assert state["step"] == 5 and set(state["manifest"]) == {"model.safetensors", "rng.safetensors", "recipe.toml",
                                                             "tokenizer.model", "optimizer.safetensors"}
    # saving the same step again keeps the complete directory
    again = save(tmp_path, 5, tiny_model())
    assert again == path and ck.read_trainer_state(path)["manifest"] == state["manifest"]


def test_newest_checkpoint_survives_a_crash_between_rename_and_pointer(tmp_path):
    model = tiny_model()
    save(tmp_path, 1, model)
    save(tmp_path, 2, model)
    ck.write_pointer(tmp_path, "latest", "step_00000001")  # as if the pointer update was lost
    (tmp_path / "step_00000003.tmp").mkdir()  # a save killed half-way
    assert layout.newest_checkpoint(tmp_path) == "step_00000002"
    assert ck.remove_stale_tmp(tmp_path) == ["step_00000003.tmp"]


def test_rotation_keeps_last_n_and_pointed(tmp_path):
    model = tiny_model()
    for step in range(1, 6):
        save(tmp_path, step, model)
    ck.write_pointer(tmp_path, "best", "step_00000002")
    deleted = ck.rotate(tmp_path, keep_last=2, protected=set())
    assert deleted == ["step_00000001", "step_00000003"]
    assert layout.list_checkpoints(tmp_path) == ["step_00000002", "step_00000004", "step_00000005"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "json"])
def test_corruption_is_reported_with_the_previous_checkpoint(tmp_path, damage):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    run_steps(model, opt, 1)
    save(tmp_path, 1, model, opt)
    bad = save(tmp_path, 2, model, opt)
    target = bad / ("trainer_state.json" if damage == "json" else "optimizer.safetensors")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text("{ not json")
    with pytest.raises(ck.CorruptCheckpoint) as err:
        ck.read_trainer_state(bad)
    msg = str(err.value)
    assert "corrupt or truncated" in msg and "step_00000001" in msg and "--resume-from" in msg
    ck.read_trainer_state(tmp_path / "step_00000001")  # the previous one still loads


def test_truncated_safetensors_without_manifest_is_still_a_clear_error(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    run_steps(model, opt, 1)
    ckpt = save(tmp_path, 1, model, opt)
    f = ckpt / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ck.CorruptCheckpoint, match="optimizer.safetensors"):
        ck.load_optimizer_state(torch.optim.AdamW(model.parameters()), ckpt)
