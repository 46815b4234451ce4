"""The checkpoint format every command shares (written by training, read by generate, eval, inspect-memory).

A checkpoint directory is self-contained: `model.safetensors` (weights of the unwrapped model), `recipe.toml`
(the resolved recipe, from which the shapes are rebuilt) and `tokenizer.model`. Training adds its own state
files beside them (see lm2cli/training). A run directory holds `checkpoints/<name>/` plus the pointer files
`checkpoints/latest` and `checkpoints/best`, each a text file naming one checkpoint directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lm2cli.errors import Lm2Error

MODEL_FILE, RECIPE_FILE, TOKENIZER_FILE = "model.safetensors", "recipe.toml", "tokenizer.model"
STEP_DIR = re.compile(r"^step_(\d+)$")


def save_model_files(directory: str | Path, model, recipe, tokenizer) -> None:
    """Write weights, recipe and tokenizer into `directory` (each file atomically)."""
    from safetensors.torch import save_model

    from lm2cli import __version__
    from lm2cli.fileio import atomic_write_bytes, atomic_write_text, temp_file_for

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # never save the torch.compile wrapper (its keys are prefixed)
    model = getattr(model, "module", model)  # nor the DDP wrapper
    fd, tmp = temp_file_for(directory / MODEL_FILE)
    os.close(fd)
    try:
        # save_model (not save_file) de-duplicates tied weights such as the shared embedding / output matrix.
        save_model(model, tmp, metadata={"format": "pt", "lm2_version": __version__, "arch": model.args.arch})
        os.replace(tmp, directory / MODEL_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_text(directory / RECIPE_FILE, recipe.to_toml())
    atomic_write_bytes(directory / TOKENIZER_FILE, tokenizer.to_bytes())


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """The checkpoint directory that `path` names: itself, or a run directory's latest (or best) checkpoint."""
    path = Path(path)
    if not path.exists():
        raise Lm2Error(f"checkpoint or run directory not found: {path}")
    if (path / MODEL_FILE).is_file():
        return path
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    pointer = ckpts / which
    if pointer.is_file():
        target = ckpts / pointer.read_text().strip()
        if (target / MODEL_FILE).is_file():
            return target
    steps = sorted((int(m.group(1)), p) for p in ckpts.glob("step_*")
                   if (m := STEP_DIR.match(p.name)) and (p / MODEL_FILE).is_file())
    if steps:
        return steps[-1][1]
    raise Lm2Error(f"{path}: no checkpoint found (expected a run directory with checkpoints/, or a checkpoint "
                   f"directory containing {MODEL_FILE})")


def load_recipe_of(ckpt: Path):
    from lm2cli.recipe import recipe_from_toml

    recipe_path = ckpt / RECIPE_FILE
    if not recipe_path.is_file():
        raise Lm2Error(f"{ckpt}: incomplete checkpoint, {RECIPE_FILE} is missing")
    return recipe_from_toml(recipe_path.read_text(encoding="utf-8"), where=str(recipe_path))


def load_tokenizer_of(ckpt: Path):
    from lm2cli.data.tokenizer import Tokenizer

    tok_path = ckpt / TOKENIZER_FILE
    if not tok_path.is_file():
        raise Lm2Error(f"{ckpt}: incomplete checkpoint, {TOKENIZER_FILE} is missing")
    return Tokenizer.load(tok_path)


def load_weights(model, ckpt: Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load `ckpt/model.safetensors` into `model`; a corrupt or truncated file is a clear error."""
    from safetensors.torch import load_model

    weights = ckpt / MODEL_FILE
    if not weights.is_file():
        raise Lm2Error(f"{ckpt}: incomplete checkpoint, {MODEL_FILE} is missing")
    try:
        missing, unexpected = load_model(model, weights, strict=strict)
    except RuntimeError as e:
        raise Lm2Error(f"{weights}: weights do not match the recipe's model ({str(e).splitlines()[0]})") from None
    except Exception as e:  # SafetensorError: truncated header, bad JSON, short file
        raise Lm2Error(f"{weights}: corrupt or truncated weights file ({e})") from None
    return list(missing), list(unexpected)


def load_for_inference(path: str | Path, device=None, which: str = "latest"):
    """(model in eval mode, tokenizer, recipe) from a checkpoint or run directory."""
    from lm2cli.model import build_model

    ckpt = find_checkpoint(path, which)
    recipe = load_recipe_of(ckpt)
    tokenizer = load_tokenizer_of(ckpt)
    model = build_model(recipe, vocab_size=tokenizer.vocab_size)
    if model.args.vocab_size != tokenizer.vocab_size:
        raise Lm2Error(f"{ckpt}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                       f"{model.args.vocab_size} (model.vocab_size); the checkpoint's files do not belong together")
    load_weights(model, ckpt)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer, recipe
