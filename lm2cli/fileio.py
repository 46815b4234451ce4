"""Small file helpers shared by every command: atomic writes and checksums.

Everything lm2 writes that a later step trusts (shards, meta.json, checkpoints, recipes) goes through a
temporary name and `os.replace`, so an interrupted command never leaves a half-written file that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def temp_file_for(path: str | Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file beside `path`, with the permissions a plain `open` would give.

    mkstemp makes files owner-only (0600); data and checkpoints are often shared on a cluster, so apply the
    usual 0666 & ~umask instead.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")  # what temp_file_for creates: .<name>.<random>.tmp


def remove_stale_temp_files(directory: str | Path) -> list[str]:
    """Delete the temporary files an interrupted atomic write left in `directory` (a killed process cannot
    clean up after itself); returns their names. Only lm2's own temp-name pattern is touched. Call it at the
    start of a command, in a directory that command owns: a concurrent writer's temp file would go too."""
    removed = []
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if _TEMP_NAME.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p.name)
    return sorted(removed)
