"""Resolving user file arguments (files, directories, globs) and checking text files for undecodable bytes."""

from __future__ import annotations

import codecs
import glob
from pathlib import Path

from lm2cli.errors import Lm2Error

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def resolve_files(patterns: list[str], key: str = "data.files",
                  suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> list[Path]:
    """Expand files, directories (recursively) and globs into a sorted, de-duplicated list of files.

    Every pattern must match at least one file with a supported suffix, and no file may be empty: silently
    training on nothing is worse than stopping.
    """
    if not patterns:
        raise Lm2Error(f"{key} is empty: list files, directories or globs of {', '.join(suffixes)} files")
    found: dict[Path, None] = {}
    for pattern in patterns:
        path = Path(pattern)
        if _is_glob(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
            matches = [p for p in matches if p.suffix.lower() in suffixes]
            if not matches:
                raise Lm2Error(f"{key}: '{pattern}' matches no {'/'.join(suffixes)} file")
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not matches:
                raise Lm2Error(f"{key}: directory '{pattern}' holds no {'/'.join(suffixes)} file")
        elif path.is_file():
            if path.suffix.lower() not in suffixes:
                raise Lm2Error(f"{key}: '{pattern}' has an unsupported type; expected one of {', '.join(suffixes)}")
            matches = [path]
        else:
            raise Lm2Error(f"{key}: '{pattern}' not found (expected a file, a directory or a glob)")
        for p in matches:
            found.setdefault(p.resolve(), None)
    files = list(found)
    for p in files:
        if p.stat().st_size == 0:
            raise Lm2Error(f"{key}: '{p}' is empty")
    return files


_bad_bytes = [0]


def _count_bad_bytes(err: UnicodeDecodeError) -> tuple[str, int]:
    _bad_bytes[0] += err.end - err.start
    return "", err.end


codecs.register_error("lm2-count-and-skip", _count_bad_bytes)


def count_bad_utf8(path: Path, block: int = 1 << 20) -> int:
    """Number of bytes of a text file that are not valid UTF-8 (0 when it is clean)."""
    _bad_bytes[0] = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="lm2-count-and-skip")
    with open(path, "rb") as f:
        while chunk := f.read(block):
            decoder.decode(chunk)
    decoder.decode(b"", final=True)
    return _bad_bytes[0]


def first_bad_offset(path: Path, block: int = 1 << 20) -> int | None:
    """Byte offset of the first byte that is not valid UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            pending = len(decoder.getstate()[0])  # bytes of an incomplete character carried over
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return offset - pending + e.start
            if not chunk:
                return None
            offset += len(chunk)
