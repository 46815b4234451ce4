"""The checkpoint format every command shares (written by training, read by generate, eval, inspect-memory).

A checkpoint directory is self-contained: `model.safetensors` (weights of the unwrapped model), `recipe.toml`
(the resolved recipe, from which the shapes are rebuilt), `tokenizer.model`, and `trainer_state.json`, whose
`manifest` records the size and sha256 of every other file. Training adds its own state files beside them (see
lm2cli/training). A run directory holds `checkpoints/step_XXXXXXXX/` plus the pointer files `checkpoints/latest`,
`checkpoints/best` and `checkpoints/best_stage_N`, each a text file naming one checkpoint directory there.

Every reader goes through `verify_checkpoint` before it uses a byte: the manifest's sizes always, its sha256
unless the user skips it (`--no-verify-checksums`, for very large models). The manifest is written by whoever
wrote the checkpoint, so this protects against damage, not against an attacker (see docs/security.md); what
protects against an attacker is that no file content chooses what code runs.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm2cli.errors import Lm2Error

MODEL_FILE, RECIPE_FILE, TOKENIZER_FILE = "model.safetensors", "recipe.toml", "tokenizer.model"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = "lm2-trainer-state"
STATE_VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"  # pointer file naming the newest checkpoint
INFERENCE_FILES = (MODEL_FILE, RECIPE_FILE, TOKENIZER_FILE)
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_POINTER = re.compile(r"^(latest|best|best_stage_\d+)$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")  # a plain file name: no path, no dot-file
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CorruptCheckpoint(Lm2Error):
    """A checkpoint whose files are damaged, missing or not what lm2 writes."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------ pointers, newest


def is_pointer_name(name: str) -> bool:
    return bool(_POINTER.match(name))


def read_pointer(root: Path, pointer: str) -> str | None:
    """The checkpoint `root/pointer` names, or None if the file is missing or does not name a `step_*`
    directory inside `root` (a pointer is never followed anywhere else, e.g. `../../elsewhere`)."""
    path = Path(root) / pointer
    if not is_pointer_name(pointer) or not path.is_file() or path.stat().st_size > 256:
        return None
    try:
        name = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if step_of(name) is not None and (Path(root) / name).is_dir() else None


def list_checkpoints(root: Path) -> list[str]:
    """Complete checkpoint directories (no `.tmp`), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if step_of(p.name) is not None and p.is_dir()]
    return sorted(names, key=step_of)


def newest_checkpoint(root: Path) -> str | None:
    """The one rule every command uses for "newest": the `latest` pointer if valid, else the highest-step
    directory, and a higher-step directory than the pointer wins (the pointer is written after the rename, so a
    crash in between leaves a complete directory newer than the pointer)."""
    names = list_checkpoints(root)
    pointed = read_pointer(root, LATEST)
    if names and (pointed is None or step_of(names[-1]) > step_of(pointed)):
        return names[-1]
    return pointed


def is_checkpoint_dir(path: Path) -> bool:
    return (Path(path) / STATE_FILE).is_file() or (Path(path) / MODEL_FILE).is_file()


def find_checkpoint(path: str | Path, which: str = LATEST, given_as: str = "") -> Path:
    """The checkpoint directory that `path` names: itself, or a run directory's (or its `checkpoints/`
    directory's) newest checkpoint; with `which = "best"` the one the `best` pointer names, else the newest.
    `given_as` names where the path came from in errors, e.g. "--resume-from"."""
    path = Path(path)
    named = f"{given_as} {path}" if given_as else str(path)
    if not path.exists():
        raise Lm2Error(f"{named}: checkpoint or run directory not found")
    if not path.is_dir():
        raise Lm2Error(f"{named} is a file; expected a run directory or a checkpoint directory")
    if is_checkpoint_dir(path):
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    name = (read_pointer(root, which) if which != LATEST else None) or newest_checkpoint(root)
    if name is not None:
        return root / name
    raise Lm2Error(f"{named}: no checkpoint found (expected a run directory with {CHECKPOINTS}/step_XXXXXXXX/, or "
                   f"a checkpoint directory containing {MODEL_FILE})")


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (the checkpoint itself when it stands alone)."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS and step_of(ckpt.name) is not None else ckpt


# ------------------------------------------------------------------- RUN_OR_CHECKPOINT_OR_RECIPE arguments


@dataclass(frozen=True)
class Target:
    """One RUN_OR_CHECKPOINT_OR_RECIPE argument of `generate`, `eval` or `inspect-memory`, resolved."""

    argument: str  # as the user gave it ("" = none: the default run)
    checkpoint: Path  # the checkpoint directory (model.safetensors, recipe.toml, tokenizer.model, ...)
    run_dir: Path  # the run directory holding it (the checkpoint itself when it stands alone)
    recipe_file: Path | None = None  # the recipe file the argument named, if it was one


def default_run() -> Path:
    """The run of the default recipe: `lm2 pretrain recipes/small.toml && lm2 generate --prompt ...` just works,
    because the schema's default output.dir is the one recipes/small.toml writes to."""
    from lm2cli.recipe import OutputConfig

    return Path(OutputConfig().dir)


def resolve_target(argument: str | Path | None, which: str = LATEST) -> Target:
    """The checkpoint a RUN_OR_CHECKPOINT_OR_RECIPE argument names: a checkpoint directory, a run directory (its
    newest checkpoint), a recipe file ending in .toml (the run in its output.dir), or nothing (the default
    recipe's run). Every command that reads a trained model resolves its argument here."""
    if argument is None or str(argument) == "":
        run = default_run()
        if not run.exists():
            raise Lm2Error(f"no run given and the default run directory {run}/ does not exist here; train one first "
                           f"with `lm2 pretrain recipes/small.toml`, or pass a run or checkpoint directory or a "
                           f"recipe file")
        ckpt = find_checkpoint(run, which)
        return Target("", ckpt, run_dir_of(ckpt))
    path = Path(argument)
    if path.suffix == ".toml" and not path.is_dir():
        from lm2cli.recipe import load_recipe

        run = Path(load_recipe(path).output.dir)
        if not run.exists():
            raise Lm2Error(f"{path}: its run directory {run} (output.dir) does not exist; train it first with "
                           f"`lm2 pretrain {path}`, or pass a run or checkpoint directory")
        ckpt = find_checkpoint(run, which, given_as=f"{path}: output.dir")
        return Target(str(argument), ckpt, run_dir_of(ckpt), path)
    if not path.exists():
        raise Lm2Error(f"{path}: not found (expected a run directory, one of its {CHECKPOINTS}/step_XXXXXXXX "
                       f"directories, or a recipe .toml file whose output.dir holds a run)")
    if not path.is_dir():
        raise Lm2Error(f"{path} is a file; expected a run directory, a checkpoint directory or a recipe .toml file")
    ckpt = find_checkpoint(path, which)
    return Target(str(argument), ckpt, run_dir_of(ckpt))


def checkpoint_info(ckpt: Path) -> dict:
    """What identifies a checkpoint in a report: {"step", "sha256" (of the weights, from the manifest), "command"
    (pretrain / finetune), "val_loss" (of its validation; None without one)}. The files are checked against the
    manifest by size first (cheap; the sha256 check happens when the weights are loaded)."""
    state = verify_checkpoint(ckpt, checksums=False)
    step, val, command = state.get("step"), state.get("val"), state.get("command")
    val_loss = val.get("val_loss") if isinstance(val, dict) else None
    return {"step": step if _is_int(step) else step_of(Path(ckpt).name),
            "sha256": state["manifest"][MODEL_FILE]["sha256"],
            "command": command if isinstance(command, str) else None,
            "val_loss": float(val_loss) if _is_number(val_loss) else None}


# ------------------------------------------------------------------------------- manifest, verification


def corrupt(ckpt: Path, what: str, use_previous: str = "use it instead") -> CorruptCheckpoint:
    """The error for a damaged checkpoint, pointing at the previous one in the same directory if any."""
    ckpt = Path(ckpt)
    root = ckpt.parent
    older = [n for n in list_checkpoints(root) if step_of(n) < (step_of(ckpt.name) or 0)]
    hint = (f"; the previous checkpoint is {root / older[-1]} ({use_previous.format(path=root / older[-1])})"
            if older else "; no older checkpoint exists in that directory" if step_of(ckpt.name) else "")
    return CorruptCheckpoint(f"checkpoint {ckpt} is corrupt or truncated ({what}){hint}")


def manifest_of(directory: Path) -> dict[str, dict]:
    """Size and sha256 of every file in `directory` except trainer_state.json (which holds the manifest)."""
    from lm2cli.fileio import sha256_file

    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(Path(directory).iterdir()) if f.is_file() and f.name != STATE_FILE}


def write_state_file(directory: Path, state: dict) -> dict:
    """trainer_state.json = `state` + format, version and the manifest of the files already in `directory`."""
    from lm2cli.fileio import atomic_write_json

    full = dict(state, format=STATE_FORMAT, version=STATE_VERSION, manifest=manifest_of(directory))
    atomic_write_json(Path(directory) / STATE_FILE, full)
    return full


def read_state_file(ckpt: Path, use_previous: str = "use it instead") -> dict:
    """trainer_state.json of `ckpt` with its format, version and manifest checked (not yet the files)."""
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise corrupt(ckpt, f"{STATE_FILE} with its file manifest is missing; it is not a complete lm2 checkpoint",
                      use_previous)
    if path.stat().st_size > 64 << 20:
        raise corrupt(ckpt, f"{STATE_FILE} is {path.stat().st_size:,} bytes, far more than lm2 writes", use_previous)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise corrupt(ckpt, f"{STATE_FILE}: {str(e)[:120]}", use_previous) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise corrupt(ckpt, f"{STATE_FILE} is not an lm2 trainer state", use_previous)
    if state.get("version") != STATE_VERSION:
        raise Lm2Error(f"checkpoint {ckpt}: trainer state version {str(state.get('version'))[:20]} is not supported "
                       f"by this lm2 (expects {STATE_VERSION})")
    problem = _manifest_problem(state.get("manifest"))
    if problem:
        raise corrupt(ckpt, f"{STATE_FILE}: {problem}", use_previous)
    return state


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "no manifest of its files"
    for name, info in manifest.items():
        if not _FILE_NAME.match(name) or name == STATE_FILE:
            return f"the manifest names {name[:60]!r}, not a file of the checkpoint directory"
        if (not isinstance(info, dict) or set(info) != {"bytes", "sha256"} or not isinstance(info["bytes"], int)
                or isinstance(info["bytes"], bool) or info["bytes"] < 0 or not isinstance(info["sha256"], str)
                or not _SHA256.match(info["sha256"])):
            return f"the manifest entry of {name} is not {{\"bytes\": <size>, \"sha256\": <64 hex digits>}}"
    return None


def verify_checkpoint(ckpt: Path, checksums: bool = True, needed: tuple[str, ...] = INFERENCE_FILES,
                      use_previous: str = "use it instead") -> dict:
    """Check every file of `ckpt` against its manifest before anything is read: present, the recorded size
    (always) and sha256 (unless `checksums` is False). Every file in `needed` must be in the manifest.
    Returns the parsed trainer_state.json."""
    from lm2cli.fileio import sha256_file

    ckpt = Path(ckpt)
    state = read_state_file(ckpt, use_previous)
    manifest = state["manifest"]
    unlisted = [n for n in needed if n not in manifest]
    if unlisted:
        raise corrupt(ckpt, f"{unlisted[0]} is not in the manifest of {STATE_FILE}", use_previous)
    for name, info in manifest.items():
        f = ckpt / name
        if not f.is_file():
            raise corrupt(ckpt, f"{name} is missing", use_previous)
        size = f.stat().st_size
        if size != info["bytes"]:
            raise corrupt(ckpt, f"{name} has {size:,} bytes, the manifest says {info['bytes']:,}", use_previous)
    if checksums:
        for name, info in manifest.items():
            if sha256_file(ckpt / name) != info["sha256"]:
                raise corrupt(ckpt, f"{name} does not match its recorded sha256 (changed after it was written); "
                                    f"--no-verify-checksums skips this check", use_previous)
    return state


# ------------------------------------------------------------------------------------------- writing


def canonicalise_safetensors_header(path: str | Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place. safetensors serialises `__metadata__` from a
    Rust HashMap, so the same tensors and metadata gave different bytes (and sha256) on every save; identical
    runs must give identical files. The sorted compact JSON has the header's length, so only it is rewritten."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # never happens for the compact JSON safetensors writes; keep the file as it is
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def save_model_files(directory: str | Path, model, recipe, tokenizer) -> None:
    """Write weights, recipe and tokenizer into `directory` (each file atomically)."""
    from safetensors.torch import save_model

    from lm2cli.fileio import atomic_write_bytes, atomic_write_text, temp_file_for
    from lm2cli.version import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # never save the torch.compile wrapper (its keys are prefixed)
    model = getattr(model, "module", model)  # nor the DDP wrapper
    fd, tmp = temp_file_for(directory / MODEL_FILE)
    os.close(fd)
    try:
        # save_model (not save_file) de-duplicates tied weights such as the shared embedding / output matrix.
        save_model(model, tmp, metadata={"format": "pt", "lm2_version": __version__, "arch": model.args.arch})
        canonicalise_safetensors_header(tmp)
        os.replace(tmp, directory / MODEL_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_text(directory / RECIPE_FILE, recipe.to_toml())
    atomic_write_bytes(directory / TOKENIZER_FILE, tokenizer.to_bytes())


# ------------------------------------------------------------------------------------------- reading


def load_recipe_of(ckpt: Path):
    from lm2cli.recipe import recipe_from_toml

    recipe_path = Path(ckpt) / RECIPE_FILE
    if not recipe_path.is_file():
        raise Lm2Error(f"{ckpt}: incomplete checkpoint, {RECIPE_FILE} is missing")
    try:
        text = recipe_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Lm2Error(f"{recipe_path}: not UTF-8 text (byte offset {e.start})") from None
    return recipe_from_toml(text, where=str(recipe_path))


def load_tokenizer_of(ckpt: Path):
    from lm2cli.data.tokenizer import Tokenizer

    tok_path = Path(ckpt) / TOKENIZER_FILE
    if not tok_path.is_file():
        raise Lm2Error(f"{ckpt}: incomplete checkpoint, {TOKENIZER_FILE} is missing")
    return Tokenizer.load(tok_path)


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise Lm2Error(f"{path}: corrupt or truncated weights file ({str(e).splitlines()[0][:160] if str(e) else e!r})"
                       ) from None


def check_weight_shapes(model, path: Path, stored: dict[str, tuple[int, ...]] | None = None) -> None:
    """Every tensor of the weights file exists in `model` with the same shape, and every parameter of `model`
    is stored (under its own name or a name it shares storage with, e.g. tied embeddings). Works on a model
    built on the meta device, so a mismatch is found before anything is allocated."""
    stored = weight_shapes(path) if stored is None else stored
    own = model.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
    unexpected = sorted(k for k in stored if k not in own)
    if unexpected:
        raise Lm2Error(f"{path}: weights do not match the recipe's model: the file has {len(unexpected)} tensor(s) "
                       f"the model lacks ({', '.join(unexpected[:3])})")
    for name, shape in stored.items():
        if tuple(own[name].shape) != shape:
            raise Lm2Error(f"{path}: tensor {name} has shape {list(shape)} in the file, the recipe's model needs "
                           f"{list(own[name].shape)}")
    groups: dict[int, list[str]] = {}
    for name, t in own.items():
        groups.setdefault(id(t), []).append(name)
    tied = {n: names for names in groups.values() for n in names}
    missing = sorted(n for n in own if not any(m in stored for m in tied.get(n, [n])))
    if missing:
        raise Lm2Error(f"{path}: weights do not match the recipe's model: {len(missing)} tensor(s) missing "
                       f"({', '.join(missing[:3])})")


def read_weights(path: str | Path) -> dict:
    """The tensors of a weights file (a checkpoint directory's model.safetensors, or the file itself), refusing
    a missing, unreadable or non-finite one with an error naming the file. Every reader of lm2 weights (inference,
    finetune.init_from, an FSDP resume) reads them here."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise Lm2Error(f"{path}: incomplete checkpoint, {MODEL_FILE} is missing")
        path = path / MODEL_FILE
    tensors, _ = read_safetensors(path, lambda what: Lm2Error(f"{path}: corrupt or truncated weights file ({what})"))
    refuse_non_finite(tensors, str(path))
    return tensors


def refuse_non_finite(tensors: dict, where: str) -> None:
    import torch

    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise Lm2Error(f"{where}: tensor {bad} holds non-finite values (inf or nan); the weights are damaged or "
                       f"training had diverged before they were saved; use an earlier checkpoint")


def load_weights(model, ckpt: Path) -> None:
    """Load `ckpt/model.safetensors` into `model` after checking names and shapes (before reading a tensor)."""
    weights = Path(ckpt) / MODEL_FILE
    if not weights.is_file():
        raise Lm2Error(f"{ckpt}: incomplete checkpoint, {MODEL_FILE} is missing")
    check_weight_shapes(model, weights)
    # Every parameter is in the file under its own name or one it shares storage with (tied embeddings, stored
    # once): the names left missing here are filled through the tensor they share.
    model.load_state_dict(read_weights(weights), strict=False)


def load_for_inference(path: str | Path, device=None, which: str = "latest", verify_checksums: bool = True):
    """(model in eval mode, tokenizer, recipe) from a checkpoint or run directory, verified before use."""
    from lm2cli.model import build_model
    from lm2cli.resources import check_inference_fits

    ckpt = find_checkpoint(path, which)
    verify_checkpoint(ckpt, checksums=verify_checksums)
    recipe = load_recipe_of(ckpt)
    tokenizer = load_tokenizer_of(ckpt)
    if recipe.model.vocab_size not in (0, tokenizer.vocab_size):
        raise Lm2Error(f"{ckpt}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                       f"{recipe.model.vocab_size} (model.vocab_size); the checkpoint's files do not belong together")
    check_inference_fits(recipe, tokenizer.vocab_size, device, where=str(ckpt / RECIPE_FILE),
                         weights=ckpt / MODEL_FILE)
    model = build_model(recipe, vocab_size=tokenizer.vocab_size)
    load_weights(model, ckpt)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer, recipe


# ------------------------------------------------------------------ carried memory (memory.carry = true)
#
# A training checkpoint of a run with memory.carry = true holds the memory each process carries into its next
# batch. Only tensors and a small JSON description are stored, never object structure: per rank, each memory
# block's bank (lm2) or the memory tokens (rmt). Reading rebuilds the state through the model being resumed
# (`init_state`, banks replaced, `carry_memory`), after checking every name, count, dtype and shape against
# that model, so no file content ever decides which code runs or what gets constructed.

MEMORY_FILE = "memory_state.safetensors"
MEMORY_FORMAT = "lm2-carried-memory"
MEMORY_VERSION = 1
_MEMORY_KEYS = {"format", "version", "arch", "ranks", "batch_size"}
_MAX_RANKS = 1 << 16


def _memory_tensor_names(arch: str, memory_layers: list[int], rank: int) -> list[str]:
    if arch == "lm2":
        return [f"rank{rank}.block{i}.bank" for i in memory_layers]
    if arch == "rmt":
        return [f"rank{rank}.rmt_memory"]
    return []  # vanilla: a carried state holds no memory, only the fact that a new sequence starts


def encode_carried_memory(model, states: list, batch_size: int) -> tuple[dict, dict]:
    """(named CPU tensors, JSON description) of each rank's carried state (`model.carry_memory` output)."""
    a = model.args
    tensors = {}
    for rank, state in enumerate(states):
        if a.arch == "lm2":
            for i in a.memory_layers:
                tensors[f"rank{rank}.block{i}.bank"] = state.layers[i].memory.bank
        elif a.arch == "rmt":
            tensors[f"rank{rank}.rmt_memory"] = state.rmt_memory
    for name, t in tensors.items():
        if t.shape[0] != batch_size:  # a bug, not user input
            raise ValueError(f"carried memory {name} has batch {t.shape[0]}, expected {batch_size}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return tensors, {"format": MEMORY_FORMAT, "version": MEMORY_VERSION, "arch": a.arch, "ranks": len(states),
                     "batch_size": batch_size}


class CarriedMemory:
    """Decoded memory_state.safetensors: `ranks` processes with `batch_size` rows, tensors checked."""

    def __init__(self, ranks: int, batch_size: int, tensors: dict):
        self.ranks, self.batch_size, self._tensors = ranks, batch_size, tensors

    def state_for(self, model, rank: int, device=None):
        """The carried ModelState of `rank`, rebuilt through `model` (what training's carry_memory gave)."""
        from dataclasses import replace

        from lm2cli.model.memory import MemoryState

        a = model.args
        state = model.init_state(self.batch_size, device)
        if a.arch == "lm2":
            layers = list(state.layers)
            for i in a.memory_layers:
                bank = self._tensors[f"rank{rank}.block{i}.bank"].to(device)
                layers[i] = replace(layers[i], memory=MemoryState(bank))
            state = replace(state, layers=layers)
        elif a.arch == "rmt":
            state = replace(state, rmt_memory=self._tensors[f"rank{rank}.rmt_memory"].to(device))
        return model.carry_memory(state)


def read_carried_memory(ckpt: Path, model) -> CarriedMemory:
    """Read and check `ckpt/memory_state.safetensors` against `model`; Lm2Error naming the file otherwise."""
    import json

    path = Path(ckpt) / MEMORY_FILE

    def bad(what: str) -> Lm2Error:
        return Lm2Error(f"{path}: not a valid carried memory for this model ({what}); resume from another "
                        f"checkpoint, or set memory.carry = false to start the memory fresh")

    if not path.is_file():
        raise bad("the file is missing")
    tensors, raw = read_safetensors(path, bad)
    try:
        desc = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        raise bad("its description is not JSON") from None
    if isinstance(desc, dict) and "list" in desc and "format" not in desc:
        desc, tensors = _legacy_carried_memory(desc, tensors, model.args, bad)
    _check_description(desc, model.args.arch, bad)
    _check_memory_tensors(tensors, desc, model.args, bad)
    return CarriedMemory(desc["ranks"], desc["batch_size"], tensors)


def read_safetensors(path: Path, bad) -> tuple[dict, str | None]:
    """(tensors, the "lm2" metadata string or None) of a safetensors file; `bad(what)` makes the error raised
    for an unreadable file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lm2")
        return load_file(str(path)), raw
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise bad(f"unreadable: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_description(desc, arch: str, bad) -> None:
    if not isinstance(desc, dict) or desc.get("format") != MEMORY_FORMAT:
        raise bad(f"no \"lm2\" description of format {MEMORY_FORMAT}")
    unknown = sorted(set(desc) - _MEMORY_KEYS)
    if unknown or set(desc) != _MEMORY_KEYS:
        raise bad(f"description keys {sorted(desc)}, expected {sorted(_MEMORY_KEYS)}")
    if desc["version"] != MEMORY_VERSION:
        raise bad(f"version {desc['version']!r}, this lm2 reads version {MEMORY_VERSION}")
    if desc["arch"] != arch:
        raise bad(f"written for model.arch = {desc['arch']!r}, the model is {arch!r}")
    for key, high in (("ranks", _MAX_RANKS), ("batch_size", 1 << 31)):
        if not _is_int(desc[key]) or not 1 <= desc[key] <= high:
            raise bad(f"{key} = {desc[key]!r}, expected an integer from 1 to {high}")


def _check_memory_tensors(tensors: dict, desc: dict, a, bad) -> None:
    import torch

    expected = [n for r in range(desc["ranks"]) for n in _memory_tensor_names(a.arch, a.memory_layers, r)]
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
        raise bad(f"tensors: {'; '.join(parts)}")
    b = desc["batch_size"]
    shape = (b, a.slots, a.slot_dim) if a.arch == "lm2" else (b, a.slots, a.d_model)
    dtypes = (torch.float32,) if a.arch == "lm2" else (torch.float32, torch.bfloat16, torch.float16)
    for name in expected:
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise bad(f"{name} has shape {tuple(t.shape)}, the model needs {shape}")
        if t.dtype not in dtypes:
            raise bad(f"{name} is {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
        if not bool(torch.isfinite(t).all()):
            raise bad(f"{name} holds non-finite values")


# Checkpoints written before the format above stored the carried state as a generic "skeleton" of nested
# dataclasses. They are still read, but only through this fixed table: a class name is compared against it and
# never imported, and the only things taken from the skeleton are the names of the bank / memory-token tensors.
# Every other field must hold exactly what `carry_memory` leaves there (position 0, no caches, nothing pending).
_LEGACY_ALIASES = {
    "ModelState": "ModelState", "lm2cli.model.model:ModelState": "ModelState",
    "LayerState": "LayerState", "lm2cli.model.model:LayerState": "LayerState",
    "MemoryState": "MemoryState", "lm2cli.model.memory:MemoryState": "MemoryState",
}
_LEGACY_FIELDS = {  # class -> {field: what it may hold}; "tensor"/"tensor?" = a tensor name (or None)
    "ModelState": {"pos": ({"value": 0},), "layers": "layers", "rmt_memory": "tensor?",
                   "rmt_seg_len": ({"value": 0},)},
    "LayerState": {"k": ({"value": None},), "v": ({"value": None},), "memory": "memory?"},
    "MemoryState": {"bank": "tensor", "pending_queries": ({"tuple": []},), "pending_contents": ({"tuple": []},),
                    "pending_len": ({"value": 0},), "keys": ({"value": None},), "values": ({"value": None},)},
}
_LEGACY_REQUIRED = {"ModelState": {"layers"}, "LayerState": set(), "MemoryState": {"bank"}}


def _legacy_object(node, cls: str, where: str, bad) -> dict:
    """The fields of a skeleton node that must be an instance of table class `cls` (by table name only)."""
    if not isinstance(node, dict) or set(node) != {"dataclass", "fields"} or not isinstance(node["fields"], dict):
        raise bad(f"{where}: expected a {cls} entry")
    name = node["dataclass"]
    if not isinstance(name, str) or _LEGACY_ALIASES.get(name) != cls:
        raise bad(f"{where}: names class {str(name)[:80]!r}; only {cls} may stand here")
    fields = node["fields"]
    allowed = _LEGACY_FIELDS[cls]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise bad(f"{where}: {cls} has no field {unknown[0][:40]!r}")
    missing = sorted(_LEGACY_REQUIRED[cls] - set(fields))
    if missing:
        raise bad(f"{where}: {cls} lacks field {missing[0]!r}")
    for key, rule in allowed.items():
        if isinstance(rule, tuple) and key in fields and fields[key] not in rule:
            raise bad(f"{where}.{key}: holds {json_preview(fields[key])}, a carried state has {rule[0]}")
    return fields


def _legacy_tensor(node, where: str, optional: bool, bad) -> str | None:
    if optional and node == {"value": None}:
        return None
    if isinstance(node, dict) and set(node) == {"tensor"} and isinstance(node["tensor"], str):
        return node["tensor"]
    raise bad(f"{where}: expected a tensor{' or null' if optional else ''}, got {json_preview(node)}")


def json_preview(node) -> str:
    import json

    text = json.dumps(node)
    return text if len(text) <= 60 else text[:57] + "..."


def _legacy_carried_memory(skeleton: dict, tensors: dict, a, bad) -> tuple[dict, dict]:
    """(description, tensors under the current names) from a pre-format skeleton, checked field by field."""
    ranks = skeleton["list"]
    if set(skeleton) != {"list"} or not isinstance(ranks, list) or not 1 <= len(ranks) <= _MAX_RANKS:
        raise bad("the legacy description is not a list of per-process states")
    renamed: dict[str, str] = {}  # stored tensor name -> current name
    for r, node in enumerate(ranks):
        fields = _legacy_object(node, "ModelState", f"rank {r}", bad)
        rmt = _legacy_tensor(fields.get("rmt_memory", {"value": None}), f"rank {r}.rmt_memory", True, bad)
        if rmt is not None:
            renamed[rmt] = f"rank{r}.rmt_memory"
        layers = fields["layers"]
        if not isinstance(layers, dict) or set(layers) != {"list"} or not isinstance(layers["list"], list):
            raise bad(f"rank {r}.layers: expected a list of LayerState entries")
        for i, layer in enumerate(layers["list"]):
            where = f"rank {r}.layers[{i}]"
            memory = _legacy_object(layer, "LayerState", where, bad).get("memory", {"value": None})
            if memory == {"value": None}:
                continue
            bank = _legacy_tensor(_legacy_object(memory, "MemoryState", f"{where}.memory", bad)["bank"],
                                  f"{where}.memory.bank", False, bad)
            renamed[bank] = f"rank{r}.block{i}.bank"
    if len(set(renamed.values())) != len(renamed) or set(renamed) != set(tensors):
        raise bad("the legacy description does not name each stored tensor exactly once")
    out = {renamed[k]: v for k, v in tensors.items()}
    batch = next((int(v.shape[0]) for v in out.values() if v.dim() > 0), 1)
    desc = {"format": MEMORY_FORMAT, "version": MEMORY_VERSION, "arch": a.arch, "ranks": len(ranks),
            "batch_size": batch}
    return desc, out
