"""What `lm2 eval` shares with the rest of lm2 and that issue 10 ("make room for eval") will move.

# issue 10 will provide these
Every import of lm2cli.training by the evaluation package happens in this file and nowhere else (a test checks
it), so switching to the modules issue 10 creates is an edit of this file only:

    Example, babilong_example   lm2cli.training.finetune -> lm2cli.data.examples
    token_byte_lengths          lm2cli.training.pretrain -> a Tokenizer method (tokenizer.token_byte_lengths())
    resolve_target              written here             -> lm2cli.checkpoint's one resolver for
                                                            RUN_OR_CHECKPOINT_OR_RECIPE (delete this copy)
    apply_overrides             written here             -> lm2cli.recipe.apply_overrides (delete this copy)
    checkpoint_info             written here             -> lm2cli.checkpoint (reads trainer_state.json)

The batch scorer issue 10 extracts from the training loop is written in lm2cli/evaluation/scoring.py, pure and
free of evaluation imports, so that it can move to its final place as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lm2cli.errors import Lm2Error
from lm2cli.training.finetune import Example, babilong_example  # noqa: F401  (issue 10: lm2cli.data.examples)
from lm2cli.training.pretrain import token_byte_lengths  # noqa: F401  (issue 10: a Tokenizer method)


@dataclass
class Target:
    """One RUN_OR_CHECKPOINT_OR_RECIPE argument, resolved."""

    argument: str  # as the user typed it
    checkpoint: Path  # the checkpoint directory (model.safetensors, recipe.toml, tokenizer.model)
    run_dir: Path  # the run directory holding it (the checkpoint itself when it stands alone)
    recipe_file: Path | None = None  # the recipe file the argument named, if it was one


def resolve_target(argument: str | Path) -> Target:
    """A checkpoint directory, a run directory (its `latest` checkpoint) or a recipe file (its output.dir run).

    issue 10 will provide the one resolver in lm2cli.checkpoint; this is its stand-in.
    """
    from lm2cli.checkpoint import find_checkpoint
    from lm2cli.recipe import load_recipe

    path = Path(argument)
    recipe_file = None
    if path.suffix == ".toml":
        recipe_file = path
        run = Path(load_recipe(path).output.dir)
        if not run.exists():
            raise Lm2Error(f"{path}: its run directory {run} (output.dir) does not exist; train it first with "
                           f"`lm2 pretrain {path}` (or give a run or checkpoint directory)")
        path = run
    ckpt = find_checkpoint(path)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    return Target(str(argument), ckpt, run_dir, recipe_file)


def apply_overrides(recipe, overrides: list[str]):
    """`recipe` with `section.key=value` overrides applied, checked exactly as `load_recipe` checks `--set`.

    issue 10 will provide lm2cli.recipe.apply_overrides; this stand-in validates the overrides through
    `load_recipe` on the defaults (same types, ranges and "did you mean" hints) and copies the checked values.
    """
    from lm2cli.recipe import load_recipe, parse_override

    if not overrides:
        return recipe
    checked = load_recipe(None, overrides)
    changed: dict[str, dict] = {}
    for text in overrides:
        section, key, _ = parse_override(text)
        changed.setdefault(section, {})[key] = getattr(getattr(checked, section), key)
    return dataclasses.replace(recipe, **{section: dataclasses.replace(getattr(recipe, section), **values)
                                          for section, values in changed.items()})


def checkpoint_info(ckpt: Path) -> dict:
    """Step, weights checksum and last validation loss of a checkpoint, from its trainer_state.json when there
    is one (the sha256 manifest written with it), else from the directory name and the weights file.

    issue 10 will provide this in lm2cli.checkpoint (the only module that knows the checkpoint layout).
    """
    import json
    import re

    from lm2cli.checkpoint import MODEL_FILE
    from lm2cli.fileio import sha256_file

    state = {}
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    step = state.get("step")
    if step is None and (m := re.fullmatch(r"step_(\d+)", ckpt.name)):
        step = int(m.group(1))
    sha = state.get("manifest", {}).get(MODEL_FILE, {}).get("sha256") or sha256_file(ckpt / MODEL_FILE)
    val = state.get("val") or {}
    return {"step": step, "sha256": sha, "command": state.get("command"), "val_loss": val.get("val_loss")}
