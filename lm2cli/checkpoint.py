"""The checkpoint format every command shares (written by training, read by generate, eval, inspect-memory).

A checkpoint directory is self-contained: `model.safetensors` (weights of the unwrapped model), `recipe.toml`
(the resolved recipe, from which the shapes are rebuilt) and `tokenizer.model`. Training adds its own state
files beside them (see lm2cli/training). A run directory holds `checkpoints/<name>/` plus the pointer files
`checkpoints/latest` and `checkpoints/best`, each a text file naming one checkpoint directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lm2cli.errors import Lm2Error

MODEL_FILE, RECIPE_FILE, TOKENIZER_FILE = "model.safetensors", "recipe.toml", "tokenizer.model"
STEP_DIR = re.compile(r"^step_(\d+)$")


def save_model_files(directory: str | Path, model, recipe, tokenizer) -> None:
    """Write weights, recipe and tokenizer into `directory` (each file atomically)."""
    from safetensors.torch import save_model

    from lm2cli import __version__
    from lm2cli.fileio import atomic_write_bytes, atomic_write_text, temp_file_for

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # never save the torch.compile wrapper (its keys are prefixed)
    model = getattr(model, "module", model)  # nor the DDP wrapper
    fd, tmp = temp_file_for(directory / MODEL_FILE)
    os.close(fd)
    try:
        # save_model (not save_file) de-duplicates tied weights such as the shared embedding / output matrix.
        save_model(model, tmp, metadata={"format": "pt", "lm2_version": __version__, "arch": model.args.arch})
        os.replace(tmp, directory / MODEL_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_text(directory / RECIPE_FILE, recipe.to_toml())
    atomic_write_bytes(directory / TOKENIZER_FILE, tokenizer.to_bytes())


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """The checkpoint directory that `path` names: itself, or a run directory's latest (or best) checkpoint."""
    path = Path(path)
    if not path.exists():
        raise Lm2Error(f"checkpoint or run directory not found: {path}")
    if (path / MODEL_FILE).is_file():
        return path
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    pointer = ckpts / which
    if pointer.is_file():
        target = ckpts / pointer.read_text().strip()
        if (target / MODEL_FILE).is_file():
            return target
    steps = sorted((int(m.group(1)), p) for p in ckpts.glob("step_*")
                   if (m := STEP_DIR.match(p.name)) and (p / MODEL_FILE).is_file())
    if steps:
        return steps[-1][1]
    raise Lm2Error(f"{path}: no checkpoint found (expected a run directory with checkpoints/, or a checkpoint "
                   f"directory containing {MODEL_FILE})")


def load_recipe_of(ckpt: Path):
    from lm2cli.recipe import recipe_from_toml

    recipe_path = ckpt / RECIPE_FILE
    if not recipe_path.is_file():
        raise Lm2Error(f"{ckpt}: incomplete checkpoint, {RECIPE_FILE} is missing")
    return recipe_from_toml(recipe_path.read_text(encoding="utf-8"), where=str(recipe_path))


def load_tokenizer_of(ckpt: Path):
    from lm2cli.data.tokenizer import Tokenizer

    tok_path = ckpt / TOKENIZER_FILE
    if not tok_path.is_file():
        raise Lm2Error(f"{ckpt}: incomplete checkpoint, {TOKENIZER_FILE} is missing")
    return Tokenizer.load(tok_path)


def load_weights(model, ckpt: Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load `ckpt/model.safetensors` into `model`; a corrupt or truncated file is a clear error."""
    from safetensors.torch import load_model

    weights = ckpt / MODEL_FILE
    if not weights.is_file():
        raise Lm2Error(f"{ckpt}: incomplete checkpoint, {MODEL_FILE} is missing")
    try:
        missing, unexpected = load_model(model, weights, strict=strict)
    except RuntimeError as e:
        raise Lm2Error(f"{weights}: weights do not match the recipe's model ({str(e).splitlines()[0]})") from None
    except Exception as e:  # SafetensorError: truncated header, bad JSON, short file
        raise Lm2Error(f"{weights}: corrupt or truncated weights file ({e})") from None
    return list(missing), list(unexpected)


def load_for_inference(path: str | Path, device=None, which: str = "latest"):
    """(model in eval mode, tokenizer, recipe) from a checkpoint or run directory."""
    from lm2cli.model import build_model

    ckpt = find_checkpoint(path, which)
    recipe = load_recipe_of(ckpt)
    tokenizer = load_tokenizer_of(ckpt)
    model = build_model(recipe, vocab_size=tokenizer.vocab_size)
    if model.args.vocab_size != tokenizer.vocab_size:
        raise Lm2Error(f"{ckpt}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                       f"{model.args.vocab_size} (model.vocab_size); the checkpoint's files do not belong together")
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
    tensors, raw = _read_safetensors(path, bad)
    try:
        desc = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        raise bad("its description is not JSON") from None
    if isinstance(desc, dict) and "list" in desc and "format" not in desc:
        desc, tensors = _legacy_carried_memory(desc, tensors, model.args, bad)
    _check_description(desc, model.args.arch, bad)
    _check_memory_tensors(tensors, desc, model.args, bad)
    return CarriedMemory(desc["ranks"], desc["batch_size"], tensors)


def _read_safetensors(path: Path, bad) -> tuple[dict, str | None]:
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
