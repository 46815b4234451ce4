"""The shared checkpoint format: find a checkpoint in a run directory, load it for inference, refuse bad ones."""

from __future__ import annotations

import pytest
import torch

from lm2cli import build_model, load_recipe
from lm2cli.checkpoint import find_checkpoint, load_for_inference, save_model_files, write_state_file
from lm2cli.data.tokenizer import train_tokenizer
from lm2cli.errors import Lm2Error


@pytest.fixture(scope="module")
def tokenizer():
    sentences = [f"Mary moved to the room number {i}. John took the apple {i % 7} there." for i in range(400)]
    return train_tokenizer(sentences, model_type="bpe", vocab_size=320, byte_fallback=True,
                           character_coverage=1.0, sample_sentences=1000, answer_token="<ans>",
                           extra_symbols=[], seed=0)


def save_run(tmp_path, tokenizer, steps=(10, 20), latest=20):
    recipe = load_recipe(None, ["model.d_model=32", "model.n_layers=2", "memory.slots=4", "memory.heads=2",
                                "memory.segment_len=8"])
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
