"""The shared checkpoint format: find a checkpoint in a run directory, load it for inference, refuse bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm2cli import build_model, load_recipe
from lm2cli.checkpoint import Target, find_checkpoint, load_for_inference, save_model_files, write_state_file
from lm2cli.data.tokenizer import train_tokenizer
from lm2cli.errors import Lm2Error


@pytest.fixture(scope="module")
def tokenizer():
    sentences = [f"Mary moved to the room number {i}. John took the apple {i % 7} there." for i in range(400)]
    return train_tokenizer(sentences, model_type="bpe", vocab_size=320, byte_fallback=True,
                           character_coverage=1.0, sample_sentences=1000, answer_token="<ans>",
                           extra_symbols=[], seed=0)


SMALL = ["model.d_model=32", "model.n_layers=2", "memory.slots=4", "memory.heads=2", "memory.segment_len=8"]


def save_run(tmp_path, tokenizer, steps=(10, 20), latest=20):
    recipe = load_recipe(None, SMALL)
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=tokenizer.vocab_size)
    for step in steps:
        save_model_files(tmp_path / "checkpoints" / f"step_{step:08d}", model, recipe, tokenizer)
        write_state_file(tmp_path / "checkpoints" / f"step_{step:08d}", {"step": step})  # the manifest
    if latest is not None:
        (tmp_path / "checkpoints" / "latest").write_text(f"step_{latest:08d}\n")
    return model


def test_run_directory_resolves_to_latest_and_loads_identically(tmp_path, tokenizer):
    model = save_run(tmp_path, tokenizer, latest=20)
    assert find_checkpoint(tmp_path).name == "step_00000020"
    # the rule resume uses: a complete directory newer than the pointer wins (a crash between rename and pointer)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010\n")
    assert find_checkpoint(tmp_path).name == "step_00000020"
    loaded, tok, recipe = load_for_inference(tmp_path)
    assert not loaded.training and tok.sha256 == tokenizer.sha256 and recipe.model.d_model == 32
    x = torch.randint(0, tokenizer.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[0], loaded(x)[0])


def test_without_pointer_the_highest_step_is_used(tmp_path, tokenizer):
    save_run(tmp_path, tokenizer, steps=(5, 100, 30), latest=None)
    assert find_checkpoint(tmp_path).name == "step_00000100"
    assert find_checkpoint(tmp_path / "checkpoints" / "step_00000030").name == "step_00000030"


def test_missing_corrupt_and_mismatched_checkpoints_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(Lm2Error, match="not found"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(Lm2Error, match="no checkpoint found"):
        find_checkpoint(tmp_path)
    save_run(tmp_path, tokenizer, steps=(10,), latest=10)
    ckpt = tmp_path / "checkpoints" / "step_00000010"
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(Lm2Error, match="corrupt or truncated"):
        load_for_inference(ckpt)
    weights.write_bytes(data)
    write_state_file(ckpt, {})  # re-sign, as for a deliberate edit: then the recipe check must catch it
    (ckpt / "recipe.toml").write_text((ckpt / "recipe.toml").read_text().replace("d_model = 32", "d_model = 48"))
    write_state_file(ckpt, {})
    with pytest.raises(Lm2Error, match=r"model.safetensors: tensor blocks.0.attn.wo.weight has shape \[32, 32\] in "
                                       r"the file, the recipe's model needs \[48, 48\]"):
        load_for_inference(ckpt)
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(Lm2Error, match="tokenizer.model is missing"):
        load_for_inference(ckpt)


# ------------------------------------------------------------------- RUN_OR_CHECKPOINT_OR_RECIPE, one resolver


def test_one_resolver_for_a_checkpoint_a_run_a_recipe_or_nothing(tmp_path, tokenizer, monkeypatch):
    from lm2cli.checkpoint import resolve_target

    run = tmp_path / "runs" / "mine"
    save_run(run, tokenizer, steps=(10, 20), latest=20)
    (run / "checkpoints" / "best").write_text("step_00000010\n")
    newest, best = run / "checkpoints" / "step_00000020", run / "checkpoints" / "step_00000010"
    recipe = tmp_path / "mine.toml"
    recipe.write_text(f'[output]\ndir = "{run}"\n')

    assert resolve_target(best) == Target(str(best), best, run)  # a checkpoint: itself, inside its run
    assert resolve_target(str(run)) == Target(str(run), newest, run)  # a run: its newest checkpoint
    assert resolve_target(run / "checkpoints").checkpoint == newest
    assert resolve_target(recipe) == Target(str(recipe), newest, run, recipe)  # a recipe: its output.dir run
    assert resolve_target(recipe, which="best").checkpoint == best
    alone = tmp_path / "alone"
    save_model_files(alone, build_model(load_recipe(None, SMALL), vocab_size=tokenizer.vocab_size),
                     load_recipe(None, SMALL), tokenizer)
    assert resolve_target(alone) == Target(str(alone), alone, alone)  # a copied checkpoint stands alone

    monkeypatch.chdir(tmp_path)  # nothing: the default recipe's run (output.dir = runs/small)
    with pytest.raises(Lm2Error, match=r"no run given and the default run directory runs/small/ does not exist.*"
                                       r"lm2 pretrain recipes/small.toml"):
        resolve_target(None)
    save_run(tmp_path / "runs" / "small", tokenizer, steps=(3,), latest=3)
    assert resolve_target(None) == Target("", Path("runs/small/checkpoints/step_00000003"), Path("runs/small"))


def test_resolver_errors_name_the_argument_and_what_would_be_valid(tmp_path, tokenizer):
    from lm2cli.checkpoint import resolve_target

    def error(argument) -> str:
        with pytest.raises(Lm2Error) as e:
            resolve_target(argument)
        assert len(e.value.problems) == 1
        return str(e.value)

    assert error(tmp_path / "nope").startswith(f"{tmp_path / 'nope'}: not found (expected a run directory")
    (tmp_path / "notes.txt").write_text("x")
    assert "notes.txt is a file; expected a run directory, a checkpoint directory or a recipe .toml" in error(
        tmp_path / "notes.txt")
    assert "recipe file not found" in error(tmp_path / "missing.toml")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[output]\ndir = "{tmp_path / "never-trained"}"\n')
    assert "its run directory" in error(recipe) and f"lm2 pretrain {recipe}" in error(recipe)
    (tmp_path / "never-trained").mkdir()
    assert f"{recipe}: output.dir {tmp_path / 'never-trained'}: no checkpoint found" in error(recipe)
    recipe.write_text("[output]\ndri = 'x'\n")
    assert "unknown key 'output.dri'" in error(recipe)


def test_checkpoint_info_reads_step_weights_sha_and_validation(tmp_path, tokenizer):
    from lm2cli.checkpoint import checkpoint_info
    from lm2cli.fileio import sha256_file

    save_run(tmp_path, tokenizer, steps=(7,), latest=7)
    ckpt = tmp_path / "checkpoints" / "step_00000007"
    info = checkpoint_info(ckpt)
    assert info == {"step": 7, "sha256": sha256_file(ckpt / "model.safetensors"), "command": None, "val_loss": None}
    write_state_file(ckpt, {"step": 7, "command": "finetune", "val": {"val_loss": 1.25}})
    assert checkpoint_info(ckpt) | {"sha256": None} == {"step": 7, "sha256": None, "command": "finetune",
                                                        "val_loss": 1.25}
    write_state_file(ckpt, {"step": "seven", "val": "high"})  # hand-edited: the name's step, no loss
    assert checkpoint_info(ckpt)["step"] == 7 and checkpoint_info(ckpt)["val_loss"] is None
    (ckpt / "model.safetensors").write_bytes(b"short")
    with pytest.raises(Lm2Error, match="model.safetensors has 5 bytes, the manifest says"):
        checkpoint_info(ckpt)


def test_the_same_model_saved_twice_gives_identical_bytes(tmp_path, tokenizer):
    """safetensors writes its metadata in hash-map order; identical runs must still give identical files (and
    sha256s, which results.json records), so the header is rewritten with sorted keys."""
    import json

    from safetensors.torch import load_file

    recipe = load_recipe(None, SMALL)
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=tokenizer.vocab_size)
    files = []
    for i in range(6):
        save_model_files(tmp_path / str(i), model, recipe, tokenizer)
        files.append((tmp_path / str(i) / "model.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    size = int.from_bytes(files[0][:8], "little")
    header = json.loads(files[0][8:8 + size])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert list(header) == sorted(header)
    loaded = load_file(tmp_path / "0" / "model.safetensors")  # still a valid file with the same tensors
    state = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
