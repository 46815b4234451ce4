"""The `lm2` command line: thin wrappers that resolve a recipe and hand it to the module doing the work.

Every recipe command takes the recipe path first and accepts `--set section.key=value` (repeatable),
`--out DIR`, `--print-recipe` and `--debug`. User errors (`Lm2Error`) become one line on stderr and exit
code 2; `--debug` (or LM2_DEBUG=1) shows the traceback too.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from lm2cli.errors import Lm2Error
from lm2cli.version import __version__

app = typer.Typer(
    name="lm2",
    help="Train, evaluate and inspect memory-augmented language models (LM2, RMT, vanilla Llama) from TOML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = False

RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML file, e.g. recipes/small.toml", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="SECTION.KEY=VALUE", help="Override one recipe key (repeatable), e.g. --set train.lr=3e-4")]
OutOpt = Annotated[Optional[str], typer.Option("--out", help="Output directory (overrides the recipe's)")]
NoVerifyOpt = Annotated[bool, typer.Option(
    "--no-verify-checksums",
    help="Check checkpoint files against their manifest by size only, skipping sha256 (for very large models)")]
PrintOpt = Annotated[bool, typer.Option("--print-recipe", help="Print the fully resolved recipe as TOML and exit")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lm2 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit")] = False,
    debug: DebugOpt = False,
) -> None:
    global _debug
    _debug = _debug or debug


def resolve(recipe_path: Path, sets: list[str] | None, out: str | None, print_recipe: bool,
            debug: bool, out_key: str = "output.dir"):
    """Load the recipe with overrides; `--out` becomes an override of the command's output key.

    Returns the Recipe, or None after printing it when --print-recipe was given.
    """
    from lm2cli.recipe import load_recipe, toml_value

    global _debug
    _debug = _debug or debug
    overrides = list(sets or [])
    if out is not None:
        if not out.strip():
            raise Lm2Error("--out is empty; name a directory (an empty path would mean the current directory), "
                           "e.g. --out runs/my-run")
        overrides.append(f"{out_key}={toml_value(out)}")
    recipe = load_recipe(recipe_path, overrides)
    if print_recipe:
        typer.echo(recipe.to_toml(), nl=False)
        return None
    return recipe


@app.command()
def tokenize(recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = None, print_recipe: PrintOpt = False,
             force: Annotated[bool, typer.Option("--force", help="Rebuild even if the inputs are unchanged")] = False,
             debug: DebugOpt = False) -> None:
    """Train (or reuse) a SentencePiece tokenizer and write train/val token shards to data.dir."""
    r = resolve(recipe, set_, out, print_recipe, debug, out_key="data.dir")
    if r is None:
        return
    from lm2cli.data.prepare import tokenize_command

    tokenize_command(r, force=force)


ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue from the newest checkpoint in the output directory (starts fresh if there is none)")]
ResumeFromOpt = Annotated[Optional[Path], typer.Option(
    "--resume-from", metavar="PATH", help="Continue from this checkpoint directory, or a run directory's newest")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Print parameter counts, derived sizes and one timed forward/backward pass; write nothing")]


@app.command()
def pretrain(recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = None, print_recipe: PrintOpt = False,
             resume: ResumeOpt = False, resume_from: ResumeFromOpt = None, dry_run: DryRunOpt = False,
             no_verify_checksums: NoVerifyOpt = False, debug: DebugOpt = False) -> None:
    """Pretrain a model on the token shards written by `lm2 tokenize`."""
    r = resolve(recipe, set_, out, print_recipe, debug)
    if r is None:
        return
    from lm2cli.training.pretrain import pretrain_command

    pretrain_command(r, recipe_path=recipe, resume=resume, resume_from=resume_from, dry_run=dry_run,
                     verify_checksums=not no_verify_checksums)


@app.command()
def finetune(recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = None, print_recipe: PrintOpt = False,
             resume: ResumeOpt = False, resume_from: ResumeFromOpt = None, dry_run: DryRunOpt = False,
             no_verify_checksums: NoVerifyOpt = False, debug: DebugOpt = False) -> None:
    """Fine-tune a checkpoint (or Hugging Face Llama weights) on BABILong rows or prompt/response pairs."""
    r = resolve(recipe, set_, out, print_recipe, debug)
    if r is None:
        return
    from lm2cli.training.finetune import finetune_command

    finetune_command(r, recipe_path=recipe, resume=resume, resume_from=resume_from, dry_run=dry_run,
                     verify_checksums=not no_verify_checksums)


@app.command("eval")
def eval_(
    targets: Annotated[Optional[list[str]], typer.Argument(
        metavar="RUN_OR_CHECKPOINT_OR_RECIPE", show_default=False,
        help="Runs, checkpoints or recipe files (a recipe means its output.dir run), evaluated side by side on "
             "the same samples; settings come from the first one's [eval] section (default: runs/small, where "
             "recipes/small.toml trains)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="eval.KEY=VALUE", help="Override one [eval] key (repeatable), e.g. --set eval.samples=20")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Results directory (default: <first run>/eval/<eval.name or a timestamp>)")] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print results.json instead of the tables")] = False,
    no_verify_checksums: NoVerifyOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Evaluate: BABILong task x length accuracy, perplexity against position, multiple choice, lm-eval tasks.

    Writes results.json, results.csv, results.md, predictions.jsonl and plots; Ctrl-C keeps what finished.
    """
    from lm2cli.evaluation import eval_command

    global _debug
    _debug = _debug or debug
    eval_command(list(targets or []), sets=list(set_ or []), out=out, json_output=json_output,
                 verify_checksums=not no_verify_checksums)


@app.command()
def generate(
    targets: Annotated[Optional[list[str]], typer.Argument(
        metavar="RUN_OR_CHECKPOINT_OR_RECIPE", show_default=False,
        help="Run directory, checkpoint, or recipe .toml (its output.dir run); default: the newest checkpoint in "
             "runs/small, where recipes/small.toml trains. A lone - reads the prompt from standard input")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Prompt text")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", help="Read the prompt from this UTF-8 file (- = standard input)")] = None,
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help='JSON lines {"prompt": ..., "id"?: ..., <sampling key>?: ...}, one output per row')] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens to generate at most")] = None,
    min_new_tokens: Annotated[Optional[int], typer.Option(help="No end-of-sequence before this many tokens")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Softmax temperature; 0 = greedy")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k most likely tokens; 0 = off")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling probability mass; 1 = off")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(
        help="Penalty for tokens already seen (>1 discourages repeats); 1 = off")] = None,
    repetition_window: Annotated[Optional[int], typer.Option(
        help="Only the last N tokens count for the penalty; 0 = all")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        "--stop", help=r"Stop before this text (repeatable; \n and \t are newline and tab)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed: the same seed gives the same text")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always take the most likely token")] = False,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object per prompt (text, token counts, stop reason, tokens/s)")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    no_verify_checksums: NoVerifyOpt = False,
    threads: Annotated[int, typer.Option(
        help="CPU threads; 0 = 1 for models under 100M parameters (fastest at batch 1), else torch's default")] = 0,
    compile: Annotated[bool, typer.Option(
        "--compile", help="Decode with the static-shape step compiled by torch.compile (compiles first; "
                          "also generate.compile in the recipe)")] = False,
    debug: DebugOpt = False,
) -> None:
    """Generate text from a checkpoint, streaming it to stdout as tokens are produced.

    Defaults for every sampling option come from the checkpoint recipe's [generate] section.
    """
    from lm2cli.generation import generate_command

    global _debug
    _debug = _debug or debug
    targets = list(targets or [])
    stdin = "-" in targets
    paths = [t for t in targets if t != "-"]
    if len(paths) > 1 or targets.count("-") > 1:
        raise Lm2Error(f"expected at most one run, checkpoint or recipe and one -, got: {' '.join(targets)}")
    generate_command(Path(paths[0]) if paths else None, prompt=prompt, prompt_file=prompt_file, prompts=prompts,
                     stdin=stdin, json_output=json_output, device=device, threads=threads, compile=compile,
                     verify_checksums=not no_verify_checksums,
                     max_new_tokens=max_new_tokens,
                     min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     repetition_penalty=repetition_penalty, repetition_window=repetition_window, stop=stop,
                     seed=seed, greedy=greedy)


@app.command("inspect-memory")
def inspect_memory(
    target: Annotated[Optional[Path], typer.Argument(
        metavar="RUN_OR_CHECKPOINT_OR_RECIPE", show_default=False,
        help="Run directory, checkpoint, or recipe (its output.dir run); default: the newest checkpoint in "
             "runs/small, where recipes/small.toml trains")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Text to read")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", help="Read the text from this UTF-8 file")] = None,
    babilong: Annotated[Optional[str], typer.Option(
        "--babilong", metavar="DIR_OR_HUB:TASK:LENGTH[:INDEX]",
        help="Read one BABILong row (default index 0); its facts are marked and scored")] = None,
    generate: Annotated[int, typer.Option(
        "--generate", metavar="K", help="Then generate K tokens greedily with the live memory and show the "
                                        "memory before and after")] = 0,
    layer: Annotated[Optional[list[str]], typer.Option(
        "--layer", metavar="L", help="Block to inspect (repeatable; default: every memory block)")] = None,
    heads: Annotated[str, typer.Option(
        "--heads", metavar="mean|max|N", help="Reduce the attention heads by mean or max, or show head N")] = "mean",
    slots: Annotated[Optional[str], typer.Option(
        "--slots", metavar="A:B", help="Slot window of the figures (default 0:20)")] = None,
    top_tokens: Annotated[int, typer.Option(
        "--top-tokens", metavar="K", help="Tokens per heatmap and top written tokens per slot")] = 20,
    read_at: Annotated[Optional[int], typer.Option(
        "--read-at", metavar="POS",
        help="Text position whose read is taken apart (associative bank) and always shown in the heatmap; "
             "default: the answer position, else the last token")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Output directory (default <run>/inspect/<name>)")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object")] = False,
    no_verify_checksums: NoVerifyOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show what the memory does: read/write heatmaps, gates, slot rankings, fact attention (BABILong).

    Writes PNG figures (with the plot extra), tensors.safetensors + index.json, summary.json and slots.jsonl.
    """
    from lm2cli.inspection.command import inspect_command

    global _debug
    _debug = _debug or debug
    inspect_command(target, prompt=prompt, file=file, babilong=babilong, generate=generate, layers=layer,
                    heads=heads, slots=slots, top_tokens=top_tokens, read_at=read_at, out=out, json_output=json_output,
                    verify_checksums=not no_verify_checksums)


@app.command()
def babilong(
    recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = None, print_recipe: PrintOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the inputs are unchanged")] = False,
    babi_text: Annotated[Optional[Path], typer.Option(
        "--babi-text", metavar="DIR",
        help="Instead: write generated stories of babilong.tasks as bAbI v1.2 text files into DIR")] = None,
    train_questions: Annotated[int, typer.Option(
        "--train-questions", min=1, metavar="N",
        help="With --babi-text: questions per task in the train files")] = 10_000,
    test_questions: Annotated[int, typer.Option(
        "--test-questions", min=1, metavar="N",
        help="With --babi-text: questions per task in the test files")] = 1_000,
    debug: DebugOpt = False,
) -> None:
    """Build BABILong-style sets (bAbI facts in haystack text) as babilong.dir/qaN/<length>.json."""
    r = resolve(recipe, set_, out, print_recipe, debug, out_key="babilong.dir")
    if r is None:
        return
    from lm2cli.data import babilong as bl

    if babi_text is not None:
        bl.write_babi_text(r, babi_text, train_questions, test_questions)
    else:
        bl.babilong_command(r, force=force)


MAX_PROBLEMS_SHOWN = 10  # a file with 1,000 bad rows gets the first few lines and a count, not 1,000 lines


def report_error(err: Lm2Error, cause: BaseException | None = None) -> None:
    problems = err.problems
    for line in problems[:MAX_PROBLEMS_SHOWN]:
        # an undecodable byte the user gave us (kept by Python as a lone surrogate) is shown, not re-raised
        print(f"error: {line}".encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        print(f"error: ... and {len(problems) - MAX_PROBLEMS_SHOWN:,} more problems of the same kind "
              f"({len(problems):,} in all)", file=sys.stderr)
    if _debug:
        traceback.print_exception(cause or err, file=sys.stderr)


_OPTIONS_WITH_VALUES = {"--set", "--out", "--resume-from"}


def normalize_resume(argv: list[str]) -> list[str]:
    """Accept `--resume PATH` as well as a bare `--resume` (click options cannot take an optional value).

    After the recipe argument of `pretrain`/`finetune`, `--resume` followed by a non-option word is rewritten
    to `--resume-from WORD`; anywhere else `--resume` stays the plain flag.
    """
    if not argv or argv[0] not in ("pretrain", "finetune"):
        return argv
    out, seen_recipe, i = [argv[0]], False, 1
    while i < len(argv):
        token = argv[i]
        if token == "--resume" and seen_recipe and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out += ["--resume-from", argv[i + 1]]
            i += 2
            continue
        if token in _OPTIONS_WITH_VALUES and i + 1 < len(argv):
            out += [token, argv[i + 1]]
            i += 2
            continue
        if not token.startswith("-"):
            seen_recipe = True
        out.append(token)
        i += 1
    return out


def run(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` and return the exit code (used by `main` and by the tests)."""
    global _debug
    argv = normalize_resume(list(sys.argv[1:] if argv is None else argv))
    _debug = bool(os.environ.get("LM2_DEBUG"))
    try:
        app(args=argv, prog_name="lm2", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Lm2Error as e:
        report_error(e)
        return e.exit_code
    except KeyboardInterrupt as e:  # every file lm2 writes is written atomically: nothing half-written is left
        report_error(Lm2Error("interrupted (Ctrl-C)"), e)
        return 130
    except BrokenPipeError:  # `lm2 ... | head`: the reader left; stop quietly like any Unix filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the environment refused something not checked beforehand (a full disk, permissions)
        where = f": {e.filename}" if e.filename else ""
        report_error(Lm2Error(f"{e.strerror or e}{where}"), e)
        return 2
    except (MemoryError, RuntimeError) as e:  # the memory estimate refuses what clearly cannot fit; this is
        if not _out_of_memory(e):                # for what it could not foresee
            raise
        first = (str(e).strip().splitlines() or ["out of memory"])[0][:200]
        report_error(Lm2Error(f"ran out of memory ({first}); lower the sizes of the recipe (train.batch_size, "
                              f"train.seq_len, model.d_model, memory.slots)"), e)
        return 2
    return 0


def _out_of_memory(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return (isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError))
            or "can't allocate memory" in str(e))


def main() -> None:
    sys.exit(run())
