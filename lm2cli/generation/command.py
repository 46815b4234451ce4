"""`lm2 generate`: read prompts, load a checkpoint, stream the continuations (or print JSON lines).

Everything the user can get wrong — no checkpoint, a tokenizer that does not fit the model, an empty or too
long prompt, a bad JSONL row or flag value — is checked for every prompt before the first token is
generated, and reported as one line per problem (exit 2).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm2cli.errors import Lm2Error
from lm2cli.recipe import GenerateConfig, check_value, section_fields, text_problem

# [generate] keys that are not per-prompt sampling settings (no JSONL row may set them)
RUN_KEYS = ("compile",)
SAMPLING_KEYS = [*(k for k in section_fields(GenerateConfig) if k not in RUN_KEYS), "greedy"]


@dataclass
class PromptJob:
    text: str
    where: str                      # names the source in error messages: "--prompt", "p.jsonl line 3", ...
    overrides: dict[str, Any] = field(default_factory=dict)
    id: Any = None                  # an optional "id" of a JSONL row, echoed in --json output


# ------------------------------------------------------------------------------------------- checking


def check_sampling_values(values: dict[str, Any], label) -> list[str]:
    """Type and range checks of sampling settings against the `[generate]` schema (the same rules and
    wording as a recipe). `label(key)` names the setting in messages, e.g. "--top-p" or "p.jsonl line 2: top_p".
    """
    problems = []
    fields = section_fields(GenerateConfig)
    for key, value in values.items():
        if key == "greedy":
            if not isinstance(value, bool):
                problems.append(f"{label(key)} = {json.dumps(value)}: expected true or false")
            continue
        tp, f = fields[key]
        if key == "stop" and isinstance(value, str):
            value = [value]
        coerced, bad = check_value(value, tp, f.metadata)
        if bad:
            problems.append(f"{label(key)} = {json.dumps(value, ensure_ascii=False)}: {bad}")
            continue
        values[key] = coerced
    return problems


def unescape_stop(text: str) -> str:
    r"""`--stop '\n\n'` means two newlines: shells make real newlines awkward to type. Only \n, \t, \\."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# -------------------------------------------------------------------------------------------- prompts


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise Lm2Error(f"{what} not found: {path}" if not path.is_dir() else f"{what} is a directory: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Lm2Error(f"{path}: not UTF-8 text (byte offset {e.start}); prompts must be UTF-8") from None


def _strip_final_newline(text: str) -> str:
    # `echo "Mary went" > p.txt` adds a newline nobody meant as part of the prompt.
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def read_prompt_rows(path: Path) -> list[PromptJob]:
    """`--prompts FILE.jsonl`: one JSON object per line, {"prompt": ..., "id"?: ..., <sampling key>?: ...}."""
    jobs, problems = [], []
    for n, line in enumerate(_read_text(path, "prompts file").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected one object per line "
                            f'such as {{"prompt": "Mary went"}}')
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            problems.append(f'{where}: expected an object with a "prompt" string, e.g. {{"prompt": "Mary went"}}')
            continue
        bad = text_problem(row["prompt"])
        if bad or ("id" in row and text_problem(json.dumps(row["id"], ensure_ascii=False))):
            problems.append(f"{where}: the prompt {bad}" if bad else f"{where}: the id is not valid UTF-8 text")
            continue
        overrides = {k: v for k, v in row.items() if k not in ("prompt", "id")}
        unknown = [k for k in overrides if k not in SAMPLING_KEYS]
        for key in unknown:
            problems.append(f"{where}: unknown key '{key}'{_did_you_mean(key)}; a row may hold prompt, id and "
                            f"{', '.join(SAMPLING_KEYS)}")
            del overrides[key]
        problems += check_sampling_values(overrides, lambda k, where=where: f"{where}: {k}")
        jobs.append(PromptJob(row["prompt"], where, overrides, row.get("id")))
    if problems:
        raise Lm2Error(problems[0], problems=problems)
    if not jobs:
        raise Lm2Error(f"{path}: no prompts (expected one JSON object per line)")
    return jobs


def _did_you_mean(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, [*SAMPLING_KEYS, "prompt", "id"], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_prompts(prompt: str | None, prompt_file: Path | None, prompts: Path | None, stdin: bool) -> list[PromptJob]:
    given = [name for name, v in (("--prompt", prompt), ("--prompt-file", prompt_file), ("--prompts", prompts),
                                  ("- (standard input)", stdin or None)) if v is not None]
    if len(given) != 1:
        which = "no prompt given" if not given else f"give only one prompt source, not {' and '.join(given)}"
        raise Lm2Error(f"{which}: use --prompt TEXT, --prompt-file PATH, --prompts FILE.jsonl or - to read "
                       f"standard input")
    if prompt is not None:
        jobs = [PromptJob(prompt, "--prompt")]
    elif prompts is not None:
        jobs = read_prompt_rows(prompts)
    elif prompt_file is not None and str(prompt_file) != "-":
        jobs = [PromptJob(_strip_final_newline(_read_text(prompt_file, "prompt file")), str(prompt_file))]
    else:
        jobs = [PromptJob(_strip_final_newline(_read_stdin()), "standard input")]
    problems = [f"{job.where}: the prompt {bad}" for job in jobs if (bad := text_problem(job.text))]
    if problems:
        raise Lm2Error(problems[0], problems=problems)
    return jobs


def _read_stdin() -> str:
    if sys.stdin.isatty():
        print("lm2 generate: reading the prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Lm2Error(f"standard input: not UTF-8 text (byte offset {e.start}); prompts must be UTF-8") from None


# ----------------------------------------------------------------------------------- model and device


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Lm2Error(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Lm2Error(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise Lm2Error(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return device


# Below this size a batch-1 decode step is a few hundred tiny ops (see docs/performance.md): splitting each
# over several CPU threads only adds synchronisation, and on a busy machine the threads wait for each other.
# Measured with a 1.2M-parameter lm2 on the shared 2-core box: 2 threads were 13x slower to decode and 170x
# slower to prefill than 1.
SINGLE_THREAD_BELOW_PARAMS = 100_000_000


def cpu_threads(requested: int, n_params: int) -> tuple[int, str]:
    """(torch CPU threads, why) for `--threads` (0 = choose)."""
    import torch

    if requested:
        return requested, "--threads"
    if n_params < SINGLE_THREAD_BELOW_PARAMS:
        return 1, f"model under {SINGLE_THREAD_BELOW_PARAMS // 1_000_000}M parameters"
    return torch.get_num_threads(), "torch default"


# ----------------------------------------------------------------------------------------- the command


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # stream: each chunk is visible as soon as it is final


def generate_command(run: Path | None, *, prompt: str | None = None, prompt_file: Path | None = None,
                     prompts: Path | None = None, stdin: bool = False, json_output: bool = False,
                     device: str = "auto", threads: int = 0, compile: bool = False, verify_checksums: bool = True,
                     **sampling: Any) -> None:
    """The whole `lm2 generate`; `sampling` holds the sampling flags (None = not given on the command line).
    `compile`: decode with the compiled static-shape step (also on when the recipe's generate.compile is)."""
    import torch

    previous_threads = torch.get_num_threads()
    try:
        _generate(run, prompt, prompt_file, prompts, stdin, json_output, device, threads, compile, sampling,
                  verify_checksums)
    finally:
        torch.set_num_threads(previous_threads)  # the thread count is process-wide; leave it as we found it


def _generate(run, prompt, prompt_file, prompts, stdin, json_output, device, threads, compile, sampling,
              verify_checksums=True) -> None:
    import torch

    from lm2cli.checkpoint import load_for_inference, resolve_target
    from lm2cli.generation.generator import Generator
    from lm2cli.generation.sampling import SamplingParams

    flags = {k: v for k, v in sampling.items() if v is not None and v is not False}
    if "stop" in flags:
        flags["stop"] = [unescape_stop(s) for s in flags["stop"]]
    problems = check_sampling_values(flags, lambda k: f"--{k.replace('_', '-')}")
    if threads < 0:
        problems.append(f"--threads = {threads}: expected 0 (choose automatically) or a positive count")
    if problems:
        raise Lm2Error(problems[0], problems=problems)
    jobs = read_prompts(prompt, prompt_file, prompts, stdin)
    torch_device = pick_device(device)
    checkpoint = resolve_target(run).checkpoint
    model, tokenizer, recipe = load_for_inference(checkpoint, device=torch_device, verify_checksums=verify_checksums)
    compile = compile or recipe.generate.compile
    generator = Generator(model.to(torch_device), tokenizer, recipe, torch_device, compile=compile)

    defaults = SamplingParams.from_recipe(recipe.generate).with_overrides(**flags)
    planned = plan_prompts(generator, jobs, defaults)

    n_params = sum(p.numel() for p in model.parameters())
    where = str(torch_device)
    if torch_device.type == "cpu":
        n_threads, why = cpu_threads(threads, n_params)
        torch.set_num_threads(n_threads)
        where += f", {n_threads} thread{'s' if n_threads > 1 else ''} ({why})"
    how = ", compiled static-shape decoding (compiling first)" if compile else ""
    print(f"lm2 generate: {checkpoint} ({recipe.model.arch}, {n_params / 1e6:.2f}M parameters) on {where}{how}",
          file=sys.stderr)
    generator.warm_up()
    try:
        for n, (job, ids, params) in enumerate(planned, start=1):
            pieces: list[str] = []
            try:
                if json_output:
                    result = generator.generate(ids, params, on_text=pieces.append)
                    _write(json.dumps(_with_id(job, result.summary()), ensure_ascii=False) + "\n")
                else:
                    generator.generate(ids, params, on_text=_write)
                    _write("\n")
            except KeyboardInterrupt:
                # Ctrl-C: finish the line, so a script reading JSON lines still gets the text so far.
                if json_output:
                    partial = {"text": "".join(pieces), "prompt_tokens": len(ids), "new_tokens": None,
                               "stop_reason": "interrupted"}
                    _write(json.dumps(_with_id(job, partial), ensure_ascii=False) + "\n")
                else:
                    _write("\n")
                raise GenerationInterrupted(f"interrupted (Ctrl-C) during prompt {n} of {len(planned)} "
                                            f"({job.where}); its text so far was printed") from None
    except BrokenPipeError:
        # `lm2 generate ... | head -n 3`: the reader left; stop quietly like any Unix filter.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _with_id(job: PromptJob, row: dict) -> dict:
    return ({"id": job.id} if job.id is not None else {}) | row


class GenerationInterrupted(Lm2Error):
    """Ctrl-C while generating: the partial output is printed; exit code 130 like any interrupted command."""

    exit_code = 130


def plan_prompts(generator, jobs: list[PromptJob], defaults) -> list[tuple[PromptJob, list[int], Any]]:
    """(job, prompt ids, sampling params) for every prompt; every empty or too long prompt is reported at
    once, before anything is generated."""
    planned, problems = [], []
    for job in jobs:
        params = defaults.with_overrides(**job.overrides)
        try:
            ids = generator.encode_prompt(job.text, job.where)
            generator.check_length(len(ids), params, job.where)
        except Lm2Error as e:
            problems += e.problems
            continue
        planned.append((job, ids, params))
    if problems:
        raise Lm2Error(problems[0], problems=problems)
    return planned
