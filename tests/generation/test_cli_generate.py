"""`lm2 generate` end to end on a tiny saved checkpoint: output modes, prompt sources, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

checkpoint_mod = pytest.importorskip("lm2cli.checkpoint")
model_core = pytest.importorskip("lm2cli.model")

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.toml"


def save_run(run_dir: Path, tokenizer, overrides=()) -> Path:
    """A run directory with one checkpoint of a freshly initialised tiny model, as training would leave it."""
    from lm2cli.recipe import load_recipe

    # memory.out_gate_bias=0: the gate open (0.5, not the default 0.018), so the
    # memory path is loud enough for these checks to test it
    recipe = load_recipe(TINY, ["model.init_std=0.3", "memory.out_gate_bias=0", *overrides])
    torch.manual_seed(0)
    model = model_core.build_model(recipe, vocab_size=tokenizer.vocab_size)
    ckpt = run_dir / "checkpoints" / "step_00000020"
    checkpoint_mod.save_model_files(ckpt, model, recipe, tokenizer)
    checkpoint_mod.write_state_file(ckpt, {"step": 20})  # the manifest every reader verifies
    (run_dir / "checkpoints" / "latest").write_text("step_00000020\n")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer) -> Path:
    return save_run(tmp_path_factory.mktemp("gen") / "run", tokenizer)


def test_plain_stream_equals_json_text(cli, run_dir):
    args = ["generate", run_dir, "--prompt", "Mary went to the", "--seed", "3", "--max-new-tokens", "30",
            "--temperature", "1.0", "--min-new-tokens", "30"]
    plain = cli(*args)
    assert plain.code == 0, plain.err
    js = cli(*args, "--json")
    assert js.code == 0, js.err
    row = json.loads(js.out)
    assert plain.out == row["text"] + "\n"
    assert row["new_tokens"] == 30 and row["stop_reason"] == "length" and row["prompt_tokens"] > 1
    assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert "step_00000020" in plain.err  # which checkpoint was used goes to stderr, not into the text


def test_same_seed_same_text_other_seed_other_text(cli, run_dir):
    def text(seed):
        res = cli("generate", run_dir, "--prompt", "Mary", "--seed", seed, "--temperature", "1.0",
                  "--max-new-tokens", "25", "--min-new-tokens", "25", "--json")
        assert res.code == 0, res.err
        return json.loads(res.out)["text"]

    assert text(1) == text(1) != text(2)


def test_stop_string_from_the_command_line(cli, run_dir):
    base = ["generate", run_dir, "--prompt", "Mary", "--greedy", "--max-new-tokens", "30", "--min-new-tokens", "30",
            "--json"]
    free = json.loads(cli(*base).out)["text"]
    stop = free[len(free) // 2:len(free) // 2 + 3]
    cut = json.loads(cli(*base, "--stop", stop).out)
    assert cut["stop_reason"] == "stop" and cut["text"] == free[:free.index(stop)]


def test_batch_of_prompts_with_row_overrides(cli, run_dir, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "Mary went", "id": "a", "min_new_tokens": 12}\n\n'
                    '{"prompt": "John", "max_new_tokens": 3, "min_new_tokens": 3, "greedy": true, "id": 7}\n'
                    '{"prompt": "Ça coûte", "stop": "e", "temperature": 1.5, "min_new_tokens": 40, '
                    '"max_new_tokens": 40}\n', encoding="utf-8")
    res = cli("generate", run_dir, "--prompts", rows, "--json", "--max-new-tokens", "12")
    assert res.code == 0, res.err
    out = [json.loads(line) for line in res.out.splitlines()]
    assert [o.get("id") for o in out] == ["a", 7, None]
    assert [o["new_tokens"] for o in out[:2]] == [12, 3]
    assert [o["stop_reason"] for o in out] == ["length", "length", "stop"]  # 40 tokens of 400 pieces hit an "e"
    assert "e" not in out[2]["text"]
    plain = cli("generate", run_dir, "--prompts", rows, "--max-new-tokens", "12")
    assert plain.code == 0 and plain.out == "".join(o["text"] + "\n" for o in out)


def test_each_prompt_of_a_batch_is_generated_as_if_alone(cli, run_dir, tmp_path):
    """A fresh state (and its own seeded generator) per prompt: a prompt's text does not depend on the prompts
    before it in the file."""
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "Sandra journeyed to the garden"}\n{"prompt": "Mary"}\n{"prompt": "Mary"}\n')
    sampling = ["--temperature", "1.0", "--max-new-tokens", "40", "--min-new-tokens", "40", "--seed", "5", "--json"]
    batch = cli("generate", run_dir, "--prompts", rows, *sampling)
    alone = cli("generate", run_dir, "--prompt", "Mary", *sampling)
    assert batch.code == alone.code == 0, batch.err
    texts = [json.loads(line)["text"] for line in batch.out.splitlines()]
    assert texts[1] == texts[2] == json.loads(alone.out)["text"] != texts[0]


def test_a_reader_that_leaves_early_stops_generation_quietly(run_dir):
    """`lm2 generate ... | head -c 5`: the reader closes the pipe; lm2 stops without a BrokenPipe traceback."""
    env = dict(os.environ, PYTHONPATH=str(TINY.parents[1]))  # this checkout, as the lm2_proc fixture does
    proc = subprocess.Popen([sys.executable, "-m", "lm2cli", "generate", str(run_dir), "--prompt", "Mary",
                             "--max-new-tokens", "2000", "--min-new-tokens", "2000", "--temperature", "1.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert len(proc.stdout.read(5)) == 5
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_prompt_file_and_stdin(cli, run_dir, tmp_path, lm2_proc):
    p = tmp_path / "prompt.txt"
    p.write_text("Mary went to the\n", encoding="utf-8")
    from_file = cli("generate", run_dir, "--prompt-file", p, "--greedy", "--max-new-tokens", "8", "--json")
    from_flag = cli("generate", run_dir, "--prompt", "Mary went to the", "--greedy", "--max-new-tokens", "8",
                    "--json")
    assert from_file.code == 0 and json.loads(from_file.out) == json.loads(from_flag.out) | {
        k: json.loads(from_file.out)[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    proc = lm2_proc("generate", run_dir, "-", "--greedy", "--max-new-tokens", "8", input="Mary went to the\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == json.loads(from_flag.out)["text"] + "\n"


def test_default_run_is_runs_small(cli, tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)
    res = cli("generate", "--prompt", "Mary")
    assert res.code == 2 and res.err.count("\n") == 1
    assert "runs/small" in res.err and "lm2 pretrain recipes/small.toml" in res.err
    save_run(tmp_path / "runs" / "small", tokenizer)
    res = cli("generate", "--prompt", "Mary", "--max-new-tokens", "4", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["new_tokens"] <= 4


def one_line_error(res, *fragments):
    assert res.code == 2, (res.out, res.err)
    assert res.err.startswith("error: ") and res.err.count("\n") == 1 and "Traceback" not in res.err, res.err
    for f in fragments:
        assert f in res.err, res.err


def test_missing_checkpoint(cli, tmp_path):
    one_line_error(cli("generate", tmp_path / "nope", "--prompt", "x"), "nope", "not found")
    (tmp_path / "empty_run").mkdir()
    one_line_error(cli("generate", tmp_path / "empty_run", "--prompt", "x"), "no checkpoint found")


def test_tokenizer_that_does_not_belong_to_the_checkpoint(cli, tmp_path, tokenizer, make_tokenizer):
    run = save_run(tmp_path / "run", tokenizer)
    other = make_tokenizer(vocab_size=350)
    (run / "checkpoints" / "step_00000020" / "tokenizer.model").write_bytes(other.to_bytes())
    one_line_error(cli("generate", run, "--prompt", "Mary"), "step_00000020")


@pytest.mark.parametrize("prompt", ["", "  \n "])
def test_empty_prompt(cli, run_dir, prompt):
    one_line_error(cli("generate", run_dir, "--prompt", prompt), "--prompt", "empty")


def test_prompt_too_long_for_full_attention(cli, run_dir, tmp_path):
    one_line_error(cli("generate", run_dir, "--prompt", "Mary went to the kitchen. " * 400),
                   "model.max_seq_len = 4096", "attention.window = 0")


def test_no_length_limit_with_a_window(cli, tmp_path, tokenizer):
    run = save_run(tmp_path / "run", tokenizer, ["attention.window=16", "model.max_seq_len=64"])
    res = cli("generate", run, "--prompt", "Mary went to the kitchen. " * 10, "--max-new-tokens", "70",
              "--min-new-tokens", "70", "--json")
    assert res.code == 0, res.err
    row = json.loads(res.out)
    assert row["prompt_tokens"] + row["new_tokens"] > 64


@pytest.mark.parametrize("flags, fragment", [
    (["--top-p", "1.5"], "--top-p = 1.5: must be <= 1"),
    (["--temperature", "-1"], "--temperature = -1.0: must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens = 0: must be >= 1"),
    (["--device", "tpu"], "--device tpu"),
    (["--threads", "-2"], "--threads = -2"),
])
def test_bad_flag_values(cli, run_dir, flags, fragment):
    one_line_error(cli("generate", run_dir, "--prompt", "Mary", *flags), fragment)


def test_prompt_sources_are_exclusive_and_required(cli, run_dir, tmp_path):
    one_line_error(cli("generate", run_dir), "no prompt given", "--prompt-file")
    one_line_error(cli("generate", run_dir, "--prompt", "a", "-"), "only one prompt source")


def test_bad_jsonl_rows_are_all_reported(cli, run_dir, tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "ok"}\nnot json\n{"prompt": "x", "top_pp": 0.5}\n{"prompt": "y", "top_k": "3"}\n'
                    '{"text": "no prompt key"}\n')
    res = cli("generate", run_dir, "--prompts", rows)
    assert res.code == 2 and "Traceback" not in res.err
    assert res.out == ""  # every row is checked before anything is generated
    lines = res.err.strip().splitlines()
    assert len(lines) == 4
    assert "line 2: invalid JSON" in lines[0]
    assert "line 3: unknown key 'top_pp' (did you mean 'top_p'?)" in lines[1]
    assert "line 4: top_k = \"3\": expected integer" in lines[2]
    assert 'line 5: expected an object with a "prompt" string' in lines[3]
    one_line_error(cli("generate", run_dir, "--prompts", tmp_path / "missing.jsonl"), "missing.jsonl")


def test_empty_prompt_in_a_batch_is_named_by_line(cli, run_dir, tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "fine"}\n{"prompt": ""}\n')
    res = cli("generate", run_dir, "--prompts", rows)
    one_line_error(res, "p.jsonl line 2", "empty")
    assert res.out == ""  # the good first row was not generated before the bad one was found


class RecordingStdout:
    """Stands in for sys.stdout and records the order of writes and flushes."""

    def __init__(self):
        self.events: list[str] = []

    def write(self, text: str) -> int:
        self.events.append("w:" + text)
        return len(text)

    def flush(self) -> None:
        self.events.append("flush")


def test_text_is_flushed_piece_by_piece(run_dir, monkeypatch):
    from lm2cli.generation.command import generate_command

    out = RecordingStdout()
    monkeypatch.setattr("sys.stdout", out)
    generate_command(run_dir, prompt="Mary went", greedy=True, max_new_tokens=20, min_new_tokens=20)
    writes = [i for i, e in enumerate(out.events) if e.startswith("w:")]
    assert len(writes) > 5  # many pieces, not one block at the end
    assert all(out.events[i + 1] == "flush" for i in writes)  # each visible at once
    assert out.events[writes[-1]] == "w:\n"


def test_stop_flag_escapes():
    from lm2cli.generation.command import unescape_stop

    assert unescape_stop(r"\n\n") == "\n\n"
    assert unescape_stop(r"a\tb\\n") == "a\tb\\n"
    assert unescape_stop("plain \\x") == "plain \\x"


def test_small_models_decode_on_one_thread_and_the_setting_is_restored(cli, run_dir):
    before = torch.get_num_threads()
    res = cli("generate", run_dir, "--prompt", "Mary", "--max-new-tokens", "3", "--device", "cpu")
    assert res.code == 0 and "1 thread (model under 100M parameters)" in res.err
    assert torch.get_num_threads() == before
    res = cli("generate", run_dir, "--prompt", "Mary", "--max-new-tokens", "3", "--threads", "2")
    assert res.code == 0 and "2 threads (--threads)" in res.err
    assert torch.get_num_threads() == before


def test_a_recipe_names_its_run_so_pretrain_and_generate_chain(cli, run_dir, tmp_path):
    """`lm2 pretrain R && lm2 generate R`: a .toml argument means the run in that recipe's output.dir."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY.read_text().replace('dir = "runs/tiny"', f'dir = "{run_dir}"'))
    args = ["--prompt", "Mary went", "--max-new-tokens", "8", "--greedy", "--json"]
    by_recipe, by_run = cli("generate", recipe, *args), cli("generate", run_dir, *args)
    assert by_recipe.code == 0, by_recipe.err
    assert json.loads(by_recipe.out)["text"] == json.loads(by_run.out)["text"]
    assert str(run_dir / "checkpoints" / "step_00000020") in by_recipe.err
    recipe.write_text(f'[output]\ndir = "{tmp_path / "untrained"}"\n')
    one_line_error(cli("generate", recipe, "--prompt", "x"), "output.dir", f"lm2 pretrain {recipe}")
