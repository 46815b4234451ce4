"""Issue 9 for `lm2 inspect-memory`: a checkpoint whose weights changed after they were written is refused in
one line naming the file, before anything is written; `--no-verify-checksums` skips the sha256 only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

STEP = Path("checkpoints") / "step_00000010"


def one_error(res) -> str:
    lines = res.err.splitlines()
    assert res.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.err, res
    return lines[0]


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.fixture
def run(runs, tmp_path) -> Path:
    return Path(shutil.copytree(runs["lm2"], tmp_path / "run"))


def inspect(cli, run: Path, out: Path, *extra: str):
    return cli("inspect-memory", run, "--prompt", "Mary went to the kitchen.", "--out", out, *extra)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [
    (lambda w: flip_byte(w, -5), "model.safetensors does not match its recorded sha256"),  # same size
    (lambda w: w.write_bytes(w.read_bytes()[:-4]), "model.safetensors has"),  # truncated
])
def test_damaged_weights_are_refused_naming_the_file_and_nothing_is_written(cli, run, tmp_path, damage, message):
    damage(run / STEP / "model.safetensors")
    before = files_under(run)
    line = one_error(inspect(cli, run, tmp_path / "out"))
    assert message in line and str(run / STEP) in line
    assert not (tmp_path / "out").exists() and files_under(run) == before
    line = one_error(cli("inspect-memory", run, "--prompt", "Mary"))  # the default output, inside the run
    assert message in line and files_under(run) == before


def test_without_checksums_a_changed_byte_passes_but_a_truncation_does_not(cli, run, tmp_path, no_figures):
    weights = run / STEP / "model.safetensors"
    flip_byte(weights, -5)  # lands in a weight: the model still loads
    res = inspect(cli, run, tmp_path / "out", "--no-verify-checksums")
    assert res.code == 0, res.err
    assert "--no-verify-checksums skips this check" in one_error(inspect(cli, run, tmp_path / "again"))
    weights.write_bytes(weights.read_bytes()[:-4])
    line = one_error(inspect(cli, run, tmp_path / "cut", "--no-verify-checksums"))
    assert "model.safetensors has" in line and "the manifest says" in line
    assert not (tmp_path / "again").exists() and not (tmp_path / "cut").exists()
