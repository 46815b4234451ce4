"""Where commands write: never over a user's files, never scattered into a directory that is not lm2's.

Every command that writes a directory (`tokenize`: data.dir, `pretrain`/`finetune`: output.dir, `babilong`:
babilong.dir or --babi-text DIR) calls `check_output_dir` before any work. A directory is accepted when it does
not exist yet, is empty, or is recognisably the same kind of lm2 directory (by lm2's own files: a run's
checkpoints/, a data directory's meta.json, ...), so re-running or resuming works. Anything else is refused
with one line saying what to do: a non-empty directory of someone else's files, a recipe.toml lm2 did not
write (a run would replace it with the resolved recipe), a path that is a file or lies under one, an empty
path (which would mean the current directory), a directory that cannot be written.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lm2cli.checkpoint import CHECKPOINTS, RECIPE_FILE
from lm2cli.errors import Lm2Error

RESOLVED_RECIPE_HEADER = "# Resolved lm2 recipe"


@dataclass(frozen=True)
class DirKind:
    name: str  # "run", "data", ... for messages
    names: frozenset[str]  # the entries lm2 writes in such a directory
    meta_format: str | None  # meta.json "format" that marks it, if any
    writes_recipe: bool
    suggest: str  # a subdirectory name to suggest instead


RUN = DirKind("run", frozenset({RECIPE_FILE, "metrics.jsonl", "metrics.csv", "tensorboard", CHECKPOINTS}),
              None, True, "run")
DATA = DirKind("token-shard", frozenset({"tokenizer.model", "train.bin", "train.idx", "val.bin", "val.idx",
                                         "meta.json", "recipe.toml"}), "lm2-token-shards", True, "data")
BABILONG = DirKind("BABILong", frozenset({"meta.json"}), "babilong", False, "babilong")
BABI_TEXT = DirKind("bAbI text", frozenset({"meta.json"}), "lm2-babi-text", False, "babi")
_KINDS = (RUN, DATA, BABILONG, BABI_TEXT)


def is_resolved_recipe(path: Path) -> bool:
    """A recipe.toml that lm2 wrote (a resolved recipe starts with lm2's header line)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(RESOLVED_RECIPE_HEADER)).decode("utf-8", "replace") == RESOLVED_RECIPE_HEADER
    except OSError:
        return False


def meta_format(directory: Path) -> str | None:
    path = directory / "meta.json"
    if not path.is_file() or path.stat().st_size > 64 << 20:
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or "lm2_version" not in meta or not isinstance(meta.get("format"), str):
        return None  # e.g. a downloaded BABILong set: the same layout, but not lm2's to overwrite
    return meta["format"]


def _is_lm2_temp(name: str, kind: DirKind) -> bool:
    from lm2cli.fileio import _TEMP_NAME

    return bool(_TEMP_NAME.match(name)) and any(name.startswith(f".{n}.") for n in kind.names)


def _marked(directory: Path, kind: DirKind) -> bool:
    """Does `directory` carry the marks of an lm2 directory of this kind?"""
    if kind.meta_format is not None and meta_format(directory) == kind.meta_format:
        return True
    if kind is RUN and ((directory / CHECKPOINTS).is_dir() or (directory / "metrics.jsonl").is_file()):
        return True
    return kind.writes_recipe and is_resolved_recipe(directory / RECIPE_FILE)


def _other_kind(directory: Path, kind: DirKind) -> DirKind | None:
    fmt = meta_format(directory)
    for other in _KINDS:
        if other is not kind and other.meta_format is not None and fmt == other.meta_format:
            return other
    if kind is not RUN and (directory / CHECKPOINTS).is_dir():
        return RUN
    return None


def _listing(entries: list[str]) -> str:
    shown = ", ".join(sorted(entries)[:4])
    return shown + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")


def check_output_dir(path: str | Path, key: str, kind: DirKind, probe: bool = True) -> Path:
    """Refuse an output directory lm2 must not write (see the module docstring); return it as a Path.

    `key` names the setting in messages (e.g. "--out / output.dir"). With `probe`, writability is tested by
    creating and removing a temporary directory (the only reliable test, also for root and read-only mounts);
    without it (dry runs, which write nothing) only the permission bits are consulted.
    """
    text = str(path)
    if not text.strip():
        raise Lm2Error(f"{key} is empty; name a directory (an empty path would mean the current directory), e.g. "
                       f"--out runs/my-run")
    if "\x00" in text:
        raise Lm2Error(f"{key} = {text!r}: a path cannot contain a NUL character")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise Lm2Error(f"{key} = {path} is a file, not a directory; choose a directory (e.g. {path}-{kind.suggest})")
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), Path("."))
    if not existing.is_dir():
        raise Lm2Error(f"{key} = {path}: {existing} is a file, so no directory can be created under it")
    if path.is_dir():
        _check_owned(path, key, kind)
    _check_writable(existing, path, key, probe)
    return path


def _check_owned(path: Path, key: str, kind: DirKind) -> None:
    entries = [p.name for p in path.iterdir()]
    if not entries:
        return
    other = _other_kind(path, kind)
    if other is not None:
        raise Lm2Error(f"{key} = {path} is an lm2 {other.name} directory, not a {kind.name} directory; choose a "
                       f"new or empty directory (e.g. {path / kind.suggest})")
    recipe = path / RECIPE_FILE
    if kind.writes_recipe and recipe.exists() and not is_resolved_recipe(recipe):
        raise Lm2Error(f"{key} = {path} holds a recipe.toml that lm2 did not write; lm2 would replace it with "
                       f"the resolved recipe (losing its comments); write the output elsewhere (e.g. "
                       f"{path / kind.suggest})")
    if _marked(path, kind) or all(_is_lm2_temp(e, kind) for e in entries):
        return
    raise Lm2Error(f"{key} = {path} is not empty and is not an lm2 {kind.name} directory (it holds "
                   f"{_listing(entries)}); choose a new or empty directory (e.g. {path / kind.suggest})")


def _check_writable(existing: Path, path: Path, key: str, probe: bool) -> None:
    if not probe:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise Lm2Error(f"{key} = {path}: {existing} is not writable; choose a directory you can write")
        return
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lm2-probe-", dir=existing))
    except OSError as e:
        where = "" if existing == path else f" ({existing} does not allow creating it)"
        raise Lm2Error(f"{key} = {path}: cannot write there{where}: {e.strerror}; choose a directory you can "
                       f"write") from None
