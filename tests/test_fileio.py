"""Atomic writes: content lands whole, temporary files vanish, permissions follow the umask."""

from __future__ import annotations

import os
import stat

from lm2cli.fileio import atomic_write_json, atomic_write_text, sha256_file


def test_atomic_write_replaces_whole_file_with_default_permissions(tmp_path):
    target = tmp_path / "sub" / "meta.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["meta.json"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_sha256(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
