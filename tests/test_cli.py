"""The command-line surface: commands, help, version, recipe options and error reporting."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm2cli import __version__
from lm2cli.recipe import recipe_from_toml

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "recipes" / "small.toml"
COMMANDS = ["tokenize", "pretrain", "finetune", "eval", "generate", "inspect-memory"]


def test_help_lists_the_six_commands(cli):
    res = cli("--help")
    assert res.code == 0
    for command in COMMANDS:
        assert command in res.out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(cli, command):
    res = cli(command, "--help")
    assert res.code == 0 and "Usage:" in res.out and len(res.out.splitlines()) > 4


def test_version(cli):
    res = cli("--version")
    assert res.code == 0 and res.out.strip() == f"lm2 {__version__}"


@pytest.mark.parametrize("command", ["tokenize", "pretrain", "finetune"])  # eval and inspect-memory read a run
def test_print_recipe_prints_resolved_toml(cli, command):
    res = cli(command, SMALL, "--print-recipe", "--set", "train.lr=0.0005", "--out", "elsewhere")
    assert res.code == 0, res.err
    r = recipe_from_toml(res.out)
    assert r.train.lr == 0.0005
    out_key = "data" if command == "tokenize" else "output"
    assert getattr(r, out_key).dir == "elsewhere"


def test_misspelled_key_is_one_line_exit_2(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 10\nlearning_rate = 0.1\n")
    res = cli("pretrain", bad)
    assert res.code == 2
    assert res.err.count("\n") == 1 and "Traceback" not in res.err
    assert "did you mean" in res.err and "bad.toml" in res.err


def test_bad_set_value(cli):
    res = cli("pretrain", SMALL, "--set", "train.steps=-3")
    assert res.code == 2 and "train.steps = -3: must be >= 1" in res.err


def test_missing_recipe(cli, tmp_path):
    res = cli("pretrain", tmp_path / "missing.toml")
    assert res.code == 2 and "missing.toml" in res.err and res.err.count("\n") == 1


def test_debug_shows_traceback(cli, tmp_path):
    res = cli("pretrain", tmp_path / "missing.toml", "--debug")
    assert res.code == 2 and "Traceback" in res.err


@pytest.mark.parametrize("value, traceback", [("1", True), ("", False)])
def test_lm2_debug_variable_shows_traceback(cli, tmp_path, monkeypatch, value, traceback):
    monkeypatch.setenv("LM2_DEBUG", value)
    res = cli("pretrain", tmp_path / "missing.toml")
    assert res.code == 2 and res.err.startswith("error: ") and "missing.toml" in res.err
    assert ("Traceback" in res.err) == traceback


def test_real_process_exit_code_and_stderr(lm2_proc, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[modle]\narch = 'lm2'\n")
    proc = lm2_proc("pretrain", bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "did you mean 'model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_with_a_path_becomes_resume_from():
    from lm2cli.cli import normalize_resume

    assert normalize_resume(["pretrain", "r.toml", "--resume", "runs/x"]) == \
        ["pretrain", "r.toml", "--resume-from", "runs/x"]
    assert normalize_resume(["finetune", "--set", "a.b=1", "r.toml", "--resume"]) == \
        ["finetune", "--set", "a.b=1", "r.toml", "--resume"]
    assert normalize_resume(["pretrain", "--resume", "r.toml"]) == ["pretrain", "--resume", "r.toml"]
    assert normalize_resume(["generate", "--resume", "x"]) == ["generate", "--resume", "x"]
