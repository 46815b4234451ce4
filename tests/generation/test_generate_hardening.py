"""`lm2 generate` under hostile or careless input (issue 9): undecodable prompts, huge batches of bad rows, a
crafted checkpoint recipe that cannot be allocated, Ctrl-C in the middle of JSON output."""

from __future__ import annotations

import json

import pytest

from .test_cli_generate import save_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    return save_run(tmp_path_factory.mktemp("gen-hard") / "run", tokenizer)


def one_error(res, code=2) -> str:
    lines = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert res.code == code and len(lines) == 1 and "Traceback" not in res.err, (res.code, res.err)
    return lines[0]


def test_undecodable_prompt_argument(cli, run_dir):
    # Python keeps bytes of argv that are not UTF-8 as lone surrogates: `--prompt $'\xff'` arrives like this
    line = one_error(cli("generate", run_dir, "--prompt", "Mary \udcff went"))
    assert "--prompt: the prompt is not valid UTF-8 text" in line


def test_undecodable_standard_input(run_dir):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    res = subprocess.run([sys.executable, "-m", "lm2cli", "generate", str(run_dir), "-"], input=b"Mary \xff went",
                         capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    err = res.stderr.decode()
    assert res.returncode == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "standard input: not UTF-8 text (byte offset 5)" in err


def test_undecodable_jsonl_rows(cli, run_dir, tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "Mary"}\n{"prompt": "bad \\udcff"}\n{"prompt": "x", "id": "\\ud800"}\n')
    res = cli("generate", run_dir, "--prompts", rows)
    errors = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert res.code == 2 and len(errors) == 2 and "Traceback" not in res.err, res.err
    assert "line 2: the prompt is not valid UTF-8 text" in errors[0]
    assert "line 3: the id is not valid UTF-8 text" in errors[1]


def test_a_thousand_bad_rows_print_the_first_few_and_a_count(cli, run_dir, tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text("".join('{"prompt": "x", "top_p": 7}\n' for _ in range(1000)))
    res = cli("generate", run_dir, "--prompts", rows)
    errors = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert res.code == 2 and len(errors) == 11 and "Traceback" not in res.err
    assert "line 1: top_p = 7" in errors[0] and "line 10: top_p" in errors[9]
    assert errors[10] == "error: ... and 990 more problems of the same kind (1,000 in all)"


def test_checkpoint_recipe_that_cannot_be_allocated_is_refused_before_allocating(cli, run_dir, tmp_path):
    import shutil

    from lm2cli.checkpoint import write_state_file

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = run / "checkpoints" / "step_00000020"
    recipe = (ckpt / "recipe.toml").read_text()
    (ckpt / "recipe.toml").write_text(recipe.replace("slots = 8", "slots = 10000000000"))
    write_state_file(ckpt, {"step": 20})  # whoever crafts the recipe can re-sign the manifest
    # in-process is safe: without the check, the 2.5 TB initial memory bank fails to allocate at once
    line = one_error(cli("generate", run, "--prompt", "Mary"))
    assert "needs at least 9.3 TiB" in line and "lower memory.slots" in line


def test_ctrl_c_in_json_mode_still_prints_the_partial_row(cli, run_dir, monkeypatch):
    from lm2cli.generation.generator import Generator

    real = Generator.generate

    def interrupted(self, ids, params, on_text=None):
        seen = []

        def spy(text):
            seen.append(text)
            on_text(text)
            if len(seen) == 3:
                raise KeyboardInterrupt

        return real(self, ids, params, on_text=spy)

    monkeypatch.setattr(Generator, "generate", interrupted)
    res = cli("generate", run_dir, "--prompt", "Mary", "--json", "--min-new-tokens", "20", "--max-new-tokens", "20")
    line = one_error(res, code=130)
    assert "interrupted (Ctrl-C) during prompt 1 of 1 (--prompt)" in line
    row = json.loads(res.out)
    assert row["stop_reason"] == "interrupted" and row["text"] and row["new_tokens"] is None
